"""The TFTP package's exception hierarchy."""

from __future__ import annotations

from configserver.errors import NetbootError


class TftpError(NetbootError):
    """Base of the errors the TFTP server raises on purpose."""

    code = "tftp_error"


class MalformedPacket(TftpError):
    """A datagram that is not a valid TFTP packet (logged, rate-limited, and dropped)."""

    status = 400
    code = "tftp_malformed_packet"


class FileRefused(TftpError):
    """A requested name that cannot be served; ``tftp_code`` is the TFTP error to answer."""

    status = 404
    code = "tftp_file_refused"

    def __init__(self, message: str, *, tftp_code: int) -> None:
        super().__init__(message)
        self.tftp_code = tftp_code


class TftpSocketError(TftpError):
    """The TFTP port cannot be opened (port in use, no such interface, not root)."""

    code = "tftp_socket"
