"""Refreshing the database planner's statistics after bulk changes (imports, reindexing)."""

from __future__ import annotations

from sqlalchemy import Engine


def analyze(engine: Engine) -> None:
    """Refresh planner statistics after bulk changes: without them PostgreSQL plans chained and
    _has searches over freshly loaded data as nested loops over estimated single rows."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
        conn.exec_driver_sql("ANALYZE")
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit=0")  # pooled connection: later ANALYZEs stay exact
