"""Alembic's entry point: runs fedloop's migrations on the connection that `Store` hands over.

`fedloop.store.db.migrate` opens the transaction (and takes the lock) itself and passes its
connection in `config.attributes["connection"]`; alembic then runs inside that transaction.
Without one (a developer running `alembic.command.revision(..., autogenerate=True)` with
`fedloop.store.db.alembic_config(url)`), it connects to the config's `sqlalchemy.url`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from fedloop.store.db import Base, driver_url

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables only by copying them; batch mode writes migrations that way.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("fedloop's migrations run online only (no --sql)")

_given = config.attributes.get("connection")
if _given is not None:
    _run(_given)
else:
    _engine = create_engine(driver_url(config.get_main_option("sqlalchemy.url") or ""))
    try:
        with _engine.connect() as _connection:
            _run(_connection)
    finally:
        _engine.dispose()
