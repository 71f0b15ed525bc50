"""The QEMU test farm: a private network namespace, the config server and PXE-booting VMs.

``network`` builds the namespace, bridge and taps; ``qemu`` builds and starts the VMs;
``farm`` orchestrates ``up``/``status``/``down`` with its state in a farm directory; ``cli``
is the only module that reads argv.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base of every error the farm raises on purpose; the CLI prints it as one line."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class CommandFailed(FarmError):
    """A system tool (ip, qemu-img, the config server CLI) exited non-zero."""


class BootFailed(FarmError):
    """A VM stopped, printed a fatal error on its console, or did not get ready in time."""


__all__ = ["BootFailed", "CommandFailed", "FarmError"]
