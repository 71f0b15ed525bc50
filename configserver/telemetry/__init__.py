"""Metrics of the config server (``metrics``) and the collectors that read, when scraped, what
the services and the registry hold (``collectors``)."""

from configserver.telemetry.metrics import ServerMetrics

__all__ = ["ServerMetrics"]
