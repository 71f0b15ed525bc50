# Defaults for the netboot-live element (sourced by diskimage-builder; see README.rst).
export DIB_NETBOOT_ZSTD_LEVEL=${DIB_NETBOOT_ZSTD_LEVEL:-6}
export DIB_NETBOOT_ZSTD_THREADS=${DIB_NETBOOT_ZSTD_THREADS:-0}
export DIB_NETBOOT_MODULES_EXTRA=${DIB_NETBOOT_MODULES_EXTRA:-}
export DIB_NETBOOT_FIRMWARE_ALLOW=${DIB_NETBOOT_FIRMWARE_ALLOW:-"bnx2 bnx2x tigon rtl_nic qed cxgb4 netronome mellanox"}
export DIB_NETBOOT_KEEP_DOCS=${DIB_NETBOOT_KEEP_DOCS:-0}
