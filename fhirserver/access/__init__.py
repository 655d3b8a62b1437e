"""The access gate (docs/architecture.md): the repository bound to one caller's access.

Owns: `Access` (the row predicates the authorize and consent stages granted a request, per
permission) and `AccessGate`, through which every read of a request -- read, vread, history,
search, includes, `$everything`, `$lastn`, the summary, export batches and the current version a
write changes -- gets its rows, the predicates ANDed into the one statement that fetches them.
May import: storage, search, audit and below. Reads around it inside a request raise
(`db/guard.py`).
"""

from .gate import Access, AccessGate, EventRef

__all__ = ["Access", "AccessGate", "EventRef"]
