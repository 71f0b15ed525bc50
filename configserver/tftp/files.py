"""Which file a requested name means, and shared read-only descriptors for serving it.

``ServedRoots`` maps path prefixes to directories (``{"": ipxe_dir, "images/": images_dir}``);
the longest matching prefix wins. A key without a trailing slash names one file exactly
(``{"ipxe.efi": Path("/boot/ipxe.efi")}``): that is how the composing code serves a file it
trusts outside the directories, such as Debian's ``/usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi``.
A name is refused when it is absolute, contains a backslash, NUL or control character, has an
empty, ``.`` or ``..`` component, or resolves (through symlinks) outside its root; only
regular files are served. ``OpenFiles`` shares one descriptor
per file among concurrent transfers, read with ``os.pread`` so no transfer holds file data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from configserver.tftp.codec import ErrorCode
from configserver.tftp.errors import FileRefused

MAX_NAME = 1024


def _refuse(message: str) -> FileRefused:
    return FileRefused(message, tftp_code=ErrorCode.ACCESS_VIOLATION)


# A catalog answers the rest of a name under its prefix with the file to serve, or None.
Catalog = Callable[[str], Path | None]


class ServedRoots:
    """Resolves request names inside the served directories and catalogs."""

    def __init__(self, roots: Mapping[str, Path | Catalog]) -> None:
        # Exact file names, then catalogs and directories by longest prefix first; paths
        # resolved once here so that containment checks are exact.
        self._catalogs = {p: c for p, c in roots.items() if callable(c)}
        paths = {p: d for p, d in roots.items() if not callable(d)}
        self._files = {name: Path(os.path.realpath(path)) for name, path in paths.items()
                       if name and not name.endswith("/")}
        self._roots = sorted(((p, Path(os.path.realpath(d))) for p, d in paths.items()
                              if p not in self._files),
                             key=lambda item: len(item[0]), reverse=True)

    def resolve(self, name: str) -> Path:
        """The real path to serve for ``name``; raises ``FileRefused`` with the TFTP code."""
        if len(name) > MAX_NAME:
            raise _refuse("file name too long")
        if name.startswith("/"):
            raise _refuse("absolute paths are not served")
        if any(ch in name for ch in "\\\0") or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise _refuse("backslash or control character in file name")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise _refuse("empty, '.' or '..' path component")
        if name in self._files:
            return self._files[name]
        for prefix, catalog in self._catalogs.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                path = catalog(name[len(prefix):])
                if path is None:
                    raise FileRefused("no such file in the catalog",
                                      tftp_code=ErrorCode.FILE_NOT_FOUND)
                return Path(os.path.realpath(path))
        for prefix, root in self._roots:
            if name.startswith(prefix) and len(name) > len(prefix):
                candidate = root.joinpath(name[len(prefix):])
                real = Path(os.path.realpath(candidate))
                if real != root and root not in real.parents:
                    raise _refuse("path leads outside the served directory")
                return real
        raise FileRefused("no served directory for this name", tftp_code=ErrorCode.FILE_NOT_FOUND)


@dataclass
class SharedFile:
    """One open, regular, read-only file and how many transfers use it."""

    fd: int
    size: int
    key: tuple[int, int, int, int]
    users: int = field(default=0)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


class OpenFiles:
    """Descriptors shared by all transfers of the same unchanged file."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int, int, int], SharedFile] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def acquire(self, path: Path) -> SharedFile:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileRefused("file not found",
                                  tftp_code=ErrorCode.FILE_NOT_FOUND) from None
            raise _refuse(f"cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _refuse("not a regular file")
            key = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
            shared = self._by_key.get(key)
            if shared is None:
                shared = SharedFile(fd, info.st_size, key)
                self._by_key[key] = shared
                fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
        shared.users += 1
        return shared

    def release(self, shared: SharedFile) -> None:
        shared.users -= 1
        if shared.users <= 0 and self._by_key.get(shared.key) is shared:
            del self._by_key[shared.key]
            with contextlib.suppress(OSError):
                os.close(shared.fd)

    def close(self) -> None:
        for shared in self._by_key.values():
            with contextlib.suppress(OSError):
                os.close(shared.fd)
        self._by_key.clear()
