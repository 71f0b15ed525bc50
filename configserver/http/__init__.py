"""The config server's HTTP side: the aiohttp application (``app``), its REST API (``api``),
HTTP boot (``boot``), the agents' API (``agentapi``), the typed application keys (``appkeys``)
and the CLI's client for the REST API (``client``)."""
