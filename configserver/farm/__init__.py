"""The QEMU test farm: a private network namespace, the config server and PXE-booting VMs.

``network`` builds the namespace, bridge and taps; ``qemu`` builds and starts the VMs;
``farm`` orchestrates ``up``/``status``/``down`` with its state in a farm directory; ``cli``
is the only module that reads argv.
"""

from __future__ import annotations

from configserver.errors import NetbootError


class FarmError(NetbootError):
    """Base of every error the farm raises on purpose; the CLI prints it as one line."""

    code = "farm_error"


class CommandFailed(FarmError):
    """A system tool (ip, qemu-img, the config server CLI) exited non-zero."""


class BootFailed(FarmError):
    """A VM stopped, printed a fatal error on its console, or did not get ready in time."""


__all__ = ["BootFailed", "CommandFailed", "FarmError"]
