"""Storage refusals as FHIR errors: the one place their HTTP status and issue code are chosen."""

from __future__ import annotations

from ..fhir.errors import FhirError
from ..storage.errors import AlreadyExists, Deleted, NotFound, StorageError, TransferRefused, VersionConflict

STATUS: dict[type[StorageError], tuple[int, str]] = {
    NotFound: (404, "not-found"),
    Deleted: (410, "deleted"),
    AlreadyExists: (409, "duplicate"),
    VersionConflict: (412, "conflict"),
    TransferRefused: (403, "forbidden"),
}


def fhir_error(err: StorageError) -> FhirError:
    status, code = STATUS[type(err)]
    return FhirError(status, code, err.message, headers={"ETag": err.etag} if err.etag else None)
