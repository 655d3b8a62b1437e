"""The repository's extension point for packages above storage."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import Connection


class WriteHook(Protocol):
    """What a package above storage adds to every write path (REST, Bundles, imports, the demo,
    reindexing) without subclassing the repository: the consent package labels sensitive data on
    prepare and keeps a Consent's rule rows in step with the Consent in the same transaction."""

    def prepare(self, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body to store (may be a changed copy); outside any transaction."""
        ...

    def written(self, conn: Connection, pk: int, rtype: str, body: dict[str, Any] | None) -> None:
        """After a version was written (body None: deleted), inside the write's transaction."""
        ...
