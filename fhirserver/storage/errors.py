"""What the repository refuses, in storage terms; the pipeline maps each to its HTTP status in one
place (pipeline/errors.py), so storage knows nothing of HTTP."""

from __future__ import annotations


class StorageError(Exception):
    def __init__(self, message: str, etag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.etag = etag  # the current version's ETag, where one exists


class NotFound(StorageError):
    """No such resource, or no such version of it."""


class Deleted(StorageError):
    """The resource exists and its current version is a deletion."""


class AlreadyExists(StorageError):
    """A create named an id that is taken."""


class VersionConflict(StorageError):
    """An If-Match precondition does not hold (wrong version, or no resource to match)."""


class TransferRefused(StorageError):
    """The row exists and the cross-border rule hides it from this caller (the read's 403)."""
