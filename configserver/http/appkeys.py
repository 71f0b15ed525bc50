"""Typed keys for the objects an aiohttp application shares (no module-level state)."""

from __future__ import annotations

from aiohttp import web

from configserver.cloud.notify import GenerationNotifier
from configserver.config import ServerConfig
from configserver.http.websession import WebSessions
from configserver.images import ImageCatalog
from configserver.pki import CertificateAuthority, Revocations
from configserver.registry import Registry
from configserver.telemetry.metrics import ServerMetrics

CONFIG = web.AppKey("config", ServerConfig)
REGISTRY = web.AppKey("registry", Registry)
# Signs boot tickets; made at first start, kept in the state dir.
SECRET_KEY = web.AppKey("secret_key", bytes)
CATALOG = web.AppKey("catalog", ImageCatalog)
# The CA (its certificate is public: /boot/ca.pem) and the HTTPS base URL of the API, e.g.
# https://198.18.0.1:8443, for the boot side to hand to nodes.
AUTHORITY = web.AppKey("authority", CertificateAuthority)
API_BASE = web.AppKey("api_base", str)
REVOCATIONS = web.AppKey("revocations", Revocations)
# The cloud generation as this process last saw it; long polls of agents' work wait on it.
CLOUD = web.AppKey("cloud", GenerationNotifier)
# What GET /metrics shows (configserver.http.metricsapi).
METRICS = web.AppKey("metrics", ServerMetrics)
# The dashboard's login links and browser sessions (configserver.http.websession).
WEB_SESSIONS = web.AppKey("web_sessions", WebSessions)
