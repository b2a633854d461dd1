"""Alembic migrations of the archive schema, shipped with the package and applied on open."""
