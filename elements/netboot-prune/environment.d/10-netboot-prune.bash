# Defaults for the netboot-prune element (sourced by diskimage-builder; see README.rst).
export DIB_NETBOOT_MODULES_EXTRA=${DIB_NETBOOT_MODULES_EXTRA:-}
export DIB_NETBOOT_FIRMWARE_ALLOW=${DIB_NETBOOT_FIRMWARE_ALLOW:-"bnx2 bnx2x tigon rtl_nic qed cxgb4 netronome mellanox"}
export DIB_NETBOOT_KEEP_DOCS=${DIB_NETBOOT_KEEP_DOCS:-0}
