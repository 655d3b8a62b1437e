"""Database schema (every table, db/schema.py), engines (SQLite and PostgreSQL), group commit,
raw statements for hot paths, and the Alembic migrations.

May import: config, clock.
"""
