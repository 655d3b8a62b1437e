"""Alembic environment: migrations target fhirserver.db.schema.metadata."""

from __future__ import annotations

from alembic import context

from fhirserver.db.engine import make_engine
from fhirserver.db.schema import metadata

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
