"""The REST API (FastAPI): the Sonzai wire subset the sonzai SDK expects."""

from delivery.api.app import create_app
from delivery.api.context import NoWaker, Wakeable

__all__ = ["NoWaker", "Wakeable", "create_app"]
