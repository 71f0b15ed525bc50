"""Typed keys for the objects an aiohttp application shares (no module-level state)."""

from __future__ import annotations

from aiohttp import web

from configserver.config import ServerConfig
from configserver.images import ImageCatalog
from configserver.registry import Registry

CONFIG = web.AppKey("config", ServerConfig)
REGISTRY = web.AppKey("registry", Registry)
ADMIN_TOKEN = web.AppKey("admin_token", str)
# Signs boot tickets and derives agent tokens; made at first start, kept in the state dir.
SECRET_KEY = web.AppKey("secret_key", bytes)
CATALOG = web.AppKey("catalog", ImageCatalog)
