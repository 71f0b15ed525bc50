"""The state directory is private: the directory 0700, every file in it 0600.

It holds the registry (node inventories, agent token hashes), the DHCP leases and the admin
token. Files are created with mode 0600 from the start (SQLite gives a database's ``-wal``
and ``-shm`` files the mode of the database itself), and ``prepare`` tightens what an older
version or another tool left readable by others.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from configserver.errors import StoreError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def prepare(path: Path) -> None:
    """Create ``path`` (0700) or tighten it and the files directly in it."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _tighten(path, DIR_MODE)
        for entry in path.iterdir():
            if entry.is_file() and not entry.is_symlink():
                _tighten(entry, FILE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot prepare the state directory {path}: {exc.strerror}",
                         hint="it must belong to the user the server runs as") from None


def private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600 (created empty if missing), before a library
    such as SQLite opens it with the process's umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` by a 0600 file holding ``text``, atomically."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        path.chmod(current & mode)
        log.warning("%s was mode %04o; now %04o", path, current, current & mode)
