"""netboot-appliance config server: DHCP, TFTP and HTTP boot driven by a node registry."""

__version__ = "0.1.0"
