# Defaults for the netboot-agent element (sourced by diskimage-builder; see README.rst).
# The build driver (images/build.py) fills the wheelhouse and names the unit.
export DIB_NETBOOT_AGENT_WHEELHOUSE=${DIB_NETBOOT_AGENT_WHEELHOUSE:-}
export DIB_NETBOOT_AGENT_UNIT=${DIB_NETBOOT_AGENT_UNIT:-}
export DIB_NETBOOT_AGENT_REQUIREMENT=${DIB_NETBOOT_AGENT_REQUIREMENT:-netboot-agent}
export DIB_NETBOOT_AGENT_PREFIX=${DIB_NETBOOT_AGENT_PREFIX:-/opt/nodeagent}
export DIB_NETBOOT_AGENT_SYSTEM_SITE=${DIB_NETBOOT_AGENT_SYSTEM_SITE:-0}
