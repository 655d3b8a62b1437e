"""Installed IG packages (`fhirserver ig install`, docs/profiles.md): kept in the database as the
package file, one version per package name, so every instance that shares the database loads the
same profiles, value sets and code systems at start."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, inspect, select
from sqlalchemy.engine import Engine

from ..clock import now_us
from ..db.engine import read_connection, transaction
from ..db.schema import ig_package
from ..fhir.packages import Package, read_package


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    sha256: str
    installed_us: int


def installed(engine: Engine) -> list[Package]:
    """The installed packages, by name (none before the migration that holds them has run)."""
    with read_connection(engine) as conn:
        if not inspect(conn).has_table("ig_package"):
            return []
        rows = conn.execute(select(ig_package.c.content).order_by(ig_package.c.name)).all()
    return [read_package(bytes(r.content)) for r in rows]


def listing(engine: Engine) -> list[Installed]:
    with read_connection(engine) as conn:
        rows = conn.execute(select(ig_package.c.name, ig_package.c.version, ig_package.c.sha256,
                                   ig_package.c.installed_us).order_by(ig_package.c.name)).all()
    return [Installed(r.name, r.version, r.sha256, r.installed_us) for r in rows]


def install(engine: Engine, data: bytes, package: Package) -> Installed | None:
    """Store `package` (read from `data`), replacing another version of the same name; returns the
    version it replaced, if any."""
    with transaction(engine) as conn:
        old = conn.execute(select(ig_package.c.name, ig_package.c.version, ig_package.c.sha256,
                                  ig_package.c.installed_us).where(ig_package.c.name == package.name)).first()
        conn.execute(delete(ig_package).where(ig_package.c.name == package.name))
        conn.execute(ig_package.insert().values(name=package.name, version=package.version, sha256=package.sha256,
                                                installed_us=now_us(), content=data))
    return Installed(old.name, old.version, old.sha256, old.installed_us) if old is not None else None


def remove(engine: Engine, name: str) -> bool:
    with transaction(engine) as conn:
        return conn.execute(delete(ig_package).where(ig_package.c.name == name)).rowcount > 0
