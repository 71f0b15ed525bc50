# Defaults for the netboot-live element (sourced by diskimage-builder; see README.rst).
export DIB_NETBOOT_ZSTD_LEVEL=${DIB_NETBOOT_ZSTD_LEVEL:-6}
export DIB_NETBOOT_ZSTD_THREADS=${DIB_NETBOOT_ZSTD_THREADS:-0}
