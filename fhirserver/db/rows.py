"""The type of a result row whose columns the query names (SQLAlchemy 2.1 types a Row by its
columns; callers read them by attribute)."""

from __future__ import annotations

from typing import Any, TypeAlias

from sqlalchemy import Row, Select

AnyRow: TypeAlias = Row[*tuple[Any, ...]]
AnySelect: TypeAlias = Select[*tuple[Any, ...]]
