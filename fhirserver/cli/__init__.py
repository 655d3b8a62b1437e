"""The `fhirserver` command line: one module per command group, all registered on `main`.

May import: anything (it is the top layer).
"""

from __future__ import annotations

from . import clients, data, ig, privacy, serve, subscriptions, users  # noqa: F401 - registers the commands on main
from .root import main

__all__ = ["main"]
