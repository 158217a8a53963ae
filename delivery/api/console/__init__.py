"""
The operator console: a few server-rendered pages at ``/console`` (``delivery web``
and ``delivery run`` serve it with the API), to find a user and see what was sent,
when and why not, look at a schedule's next fires, an endpoint's failures (and send
again), and the service's health. See :mod:`delivery.api.console.pages`.
"""

from delivery.api.console.pages import install_console

__all__ = ["install_console"]
