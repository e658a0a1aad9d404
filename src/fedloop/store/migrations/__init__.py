"""Alembic migrations of the store's schema; `Store` applies them on start."""
