# Defaults for the netboot-base element (sourced by diskimage-builder; see README.rst).
# systemd-networkd configures the interfaces, not ifupdown.
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
export DIB_NETBOOT_SSH_AUTHORIZED_KEYS=${DIB_NETBOOT_SSH_AUTHORIZED_KEYS:-}
export DIB_NETBOOT_SERIAL_CONSOLE=${DIB_NETBOOT_SERIAL_CONSOLE:-ttyS0}
export DIB_NETBOOT_TIMEZONE=${DIB_NETBOOT_TIMEZONE:-Etc/UTC}
