"""``farm console NODE``: a farm VM's serial console, through the unix socket QEMU serves it on.

QEMU keeps writing everything the VM prints to its ``serial.log`` (the chardev's log file,
which the farm reads to follow boots), whether or not anyone is attached; one client at a time
may attach. Ctrl-] detaches and leaves the VM running; so does the end of non-terminal input.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
from pathlib import Path

from configserver.cli.console import Terminal, split_escape
from configserver.farm import FarmError

READ = 65536
# A unix socket's path is at most 107 bytes (sun_path); longer farm directories get no console.
MAX_SOCKET_PATH = 100


def socket_for(vm_dir: Path) -> Path | None:
    path = vm_dir / "console.sock"
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def attach(path: Path, name: str, terminal: Terminal | None = None) -> int:
    """Relay the terminal and the VM's console until Ctrl-], end of input, or the VM's end."""
    terminal = terminal or Terminal(sys.stdin.fileno(), sys.stdout.buffer, sys.stderr)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise FarmError(f"cannot attach to the console of {name}: {exc.strerror}",
                            hint="is the VM running? ('farm status'); only one client may "
                                 "attach at a time") from None
        terminal.raw()
        terminal.say(f"attached to {name}'s serial console; Ctrl-] detaches")
        try:
            return _relay(sock, terminal, name)
        finally:
            terminal.restore()


def _relay(sock: socket.socket, terminal: Terminal, name: str) -> int:
    keyboard = terminal.fd
    reading = [sock, keyboard]
    while True:
        ready, _, _ = select.select(reading, [], [])
        if sock in ready:
            data = sock.recv(READ)
            if not data:
                terminal.say(f"{name}'s console closed (the VM stopped)")
                return 1
            terminal.stdout.write(data)
            terminal.stdout.flush()
        if keyboard in ready:
            data = os.read(keyboard, READ)
            send, detach = split_escape(data)
            if send:
                sock.sendall(send)
            if detach or not data:
                terminal.say("detached; the VM runs on")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                return 0


__all__ = ["attach", "socket_for"]
