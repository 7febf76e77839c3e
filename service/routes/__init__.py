"""Thin route modules: parse, submit, format. The work lives in `service.scoring`."""

from service.routes import health, v1, v2

__all__ = ["health", "v1", "v2"]
