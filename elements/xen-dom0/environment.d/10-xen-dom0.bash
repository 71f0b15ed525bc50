# Defaults for the xen-dom0 element (sourced by diskimage-builder; see README.rst).
export DIB_XEN_DOM0_MEM=${DIB_XEN_DOM0_MEM:-1024M}
export DIB_XEN_DOM0_VCPUS=${DIB_XEN_DOM0_VCPUS:-1}
export DIB_XEN_DOM0_QEMU=${DIB_XEN_DOM0_QEMU:-0}
export DIB_XEN_BRIDGE=${DIB_XEN_BRIDGE:-xenbr0}
# A hypervisor built from source (images/xenshadow.py): its directory (xen.gz, xen.efi,
# version), and the version the toolstack is pinned to. Empty: Debian's hypervisor.
export DIB_XEN_HYPERVISOR_DIR=${DIB_XEN_HYPERVISOR_DIR:-}
export DIB_XEN_PIN_VERSION=${DIB_XEN_PIN_VERSION:-}
