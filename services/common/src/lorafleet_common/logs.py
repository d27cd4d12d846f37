"""Logging set-up shared by the services: one line per record, to stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO", service: str = "lorafleet") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
