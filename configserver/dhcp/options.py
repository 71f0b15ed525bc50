"""PXE-related option semantics: who is asking (firmware PXE, iPXE, UEFI HTTP boot) and the
encodings of the values we send. Pure functions over ``DhcpPacket``; no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from configserver.dhcp.codec import (
    OPT_CLIENT_ARCH,
    OPT_IPXE_ENCAP,
    OPT_USER_CLASS,
    OPT_VENDOR_CLASS,
    DhcpPacket,
)

# PXE vendor sub-options inside option 43 (PXE specification 2.1, table 2-1).
PXE_DISCOVERY_CONTROL = 6
# Bit 3: "a boot file name is in this offer: download it, no boot server discovery".
PXE_USE_BOOTFILE = 0x08


class PxeArch(enum.IntEnum):
    """Client system architecture, option 93 (RFC 4578, IANA processor architecture types)."""

    BIOS = 0
    EFI_IA32 = 6
    EFI_BC = 7
    EFI_X86_64 = 9
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    HTTP_IA32 = 15
    HTTP_X86_64 = 16
    HTTP_ARM64 = 19


class BootStage(enum.StrEnum):
    """What kind of boot loader sent the request."""

    NONE = "none"  # an operating system's DHCP client
    FIRMWARE_PXE = "pxe"  # a NIC's or firmware's PXE ROM: can only fetch over TFTP
    IPXE = "ipxe"  # iPXE: fetches its script over HTTP
    HTTP_BOOT = "http"  # UEFI HTTP Boot: fetches an EFI binary over HTTP


@dataclass(frozen=True)
class BootClient:
    stage: BootStage
    arch: int | None
    vendor_class: str | None
    user_class: str | None

    @property
    def is_arm64(self) -> bool:
        return self.arch in (PxeArch.EFI_ARM64, PxeArch.HTTP_ARM64)

    @property
    def is_uefi(self) -> bool:
        return self.arch is not None and self.arch != PxeArch.BIOS


def user_classes(raw: bytes) -> list[str]:
    """Option 77: RFC 3004 length-prefixed list, or (as iPXE sends it) one bare string."""
    items: list[str] = []
    pos = 0
    while pos < len(raw):
        length = raw[pos]
        chunk = raw[pos + 1:pos + 1 + length]
        if length == 0 or len(chunk) != length:
            return [raw.decode("ascii", "replace")]
        items.append(chunk.decode("ascii", "replace"))
        pos += 1 + length
    if raw and not all(item.isprintable() for item in items):
        return [raw.decode("ascii", "replace")]
    return items if items else [raw.decode("ascii", "replace")]


def classify(packet: DhcpPacket) -> BootClient:
    """Decide which boot stage a request comes from (options 60, 77, 93 and 175)."""
    vendor_raw = packet.options.get(OPT_VENDOR_CLASS)
    vendor = vendor_raw.decode("ascii", "replace") if vendor_raw is not None else None
    arch_raw = packet.options.get(OPT_CLIENT_ARCH)
    arch = int.from_bytes(arch_raw[:2], "big") if arch_raw and len(arch_raw) >= 2 else None
    user_raw = packet.options.get(OPT_USER_CLASS)
    users = user_classes(user_raw) if user_raw else []
    user = ",".join(users) if users else None
    if "iPXE" in users or OPT_IPXE_ENCAP in packet.options:
        stage = BootStage.IPXE
    elif vendor is not None and vendor.startswith("HTTPClient"):
        stage = BootStage.HTTP_BOOT
    elif vendor is not None and vendor.startswith("PXEClient"):
        stage = BootStage.FIRMWARE_PXE
    else:
        stage = BootStage.NONE
    if arch is None and stage == BootStage.FIRMWARE_PXE:
        arch = _arch_from_vendor_class(vendor or "")
    return BootClient(stage=stage, arch=arch, vendor_class=vendor, user_class=user)


def _arch_from_vendor_class(vendor: str) -> int:
    # "PXEClient:Arch:00007:UNDI:003016": the architecture is repeated in the vendor class.
    parts = vendor.split(":")
    if len(parts) >= 3 and parts[1] == "Arch" and parts[2].isdigit():
        return int(parts[2])
    return PxeArch.BIOS


def pxe_vendor_options() -> bytes:
    """Option 43 for PXE ROMs: use the boot file in this offer, skip boot server discovery."""
    return bytes((PXE_DISCOVERY_CONTROL, 1, PXE_USE_BOOTFILE, 255))


def ip_list(addresses: tuple[str, ...] | list[str]) -> bytes:
    return b"".join(ipaddress.IPv4Address(a).packed for a in addresses)


def u32(value: int) -> bytes:
    return int(value).to_bytes(4, "big")


