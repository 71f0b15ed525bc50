# Defaults for the netboot-guest element (sourced by diskimage-builder; see README.rst).
# The guest's kernel command line, recorded in the manifest (kernel_args) for the dom0.
export DIB_NETBOOT_GUEST_KERNEL_ARGS=${DIB_NETBOOT_GUEST_KERNEL_ARGS:-"root=/dev/xvda ro console=hvc0"}
# Without netboot.server= the guest asks its DHCP server, on this port, for SSH keys.
export DIB_NETBOOT_GUEST_SERVER_PORT=${DIB_NETBOOT_GUEST_SERVER_PORT:-8080}
