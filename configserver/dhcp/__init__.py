"""The config server's DHCP server: full and ProxyDHCP modes, PXE/iPXE/UEFI boot answers.

``codec`` (bytes <-> packets, pure), ``options`` (PXE semantics), ``policy`` (the answer, from the
registry), ``leases`` (durable lease store), ``transport`` (sockets) and ``service`` (the hook
``start_dhcp`` that ``configserver serve`` calls). Importing the package loads none of them, so
``configserver.dhcp.codec`` stays importable alone.
"""
