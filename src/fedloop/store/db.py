"""Agents, rounds, local and global models, in SQLite (default) or PostgreSQL via SQLAlchemy.

Every write is one transaction; a model's blob is written before the row that names it commits,
so a crash at any point leaves either no row or a row whose blob exists. The schema is made and
changed only by the Alembic migrations in `migrations/`, which `Store` applies on start.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from fedloop.errors import FedloopError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# Alembic narrates every start at INFO from the moment it is imported (hence the imports inside
# the functions below); fedloop logs what changed instead (`migrate`).
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
# How long a process waits for another one's lock on an SQLite database.
_BUSY_SECONDS = 10
# The meta key each token revocation changes (`Store.revoke_tokens`).
REVOCATIONS_KEY = "revocations"
# Key of the PostgreSQL advisory lock that serialises migrations of one database.
_MIGRATION_LOCK = 0x666C6F6F70  # "floop"


class Base(DeclarativeBase):
    pass


class AgentRow(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class RoundRow(Base):
    __tablename__ = "rounds"
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class LocalModelRow(Base):
    __tablename__ = "local_models"
    __table_args__ = (UniqueConstraint("agent_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    round: Mapped[int] = mapped_column(Integer, index=True)
    base_round: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    nbytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


_LOCAL_COLUMNS = tuple(c.key for c in LocalModelRow.__table__.columns if c.key != "id")
_LOCAL_JSON = frozenset({"metrics"})


class GlobalModelRow(Base):
    __tablename__ = "global_models"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64))
    contributors: Mapped[list[str]] = mapped_column(JSON)
    total_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    seconds: Mapped[float] = mapped_column(Float)
    state_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


_GLOBAL_COLUMNS = tuple(c.key for c in GlobalModelRow.__table__.columns)
_GLOBAL_JSON = frozenset({"contributors", "metrics"})


def _insert_sql(table: str, columns: Sequence[str], marker: str) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([marker] * len(columns))})"
    )


def _values(row: Base, columns: Sequence[str], json_columns: frozenset[str]) -> tuple[Any, ...]:
    """The row's values in `columns` order, JSON columns as their text (as SQLAlchemy's JSON
    type writes them: `json.dumps`)."""
    return tuple(
        json.dumps(getattr(row, key)) if key in json_columns else getattr(row, key)
        for key in columns
    )


class EvaluationRow(Base):
    """An agent's metrics for a global model on its own data (the book's global accuracy)."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("agent_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    round: Mapped[int] = mapped_column(Integer, index=True)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class TokenRow(Base):
    """A secret, stored only as its SHA-256: an enrollment token, an agent's credential, or an
    admin token (`kind`). `name` is the agent name an enrollment token or credential is bound
    to (a label for admin tokens); `agent_id` is set on credentials."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DuplicateUpload(Exception):
    """This agent already has a local model for this round."""


class TokenSpent(Exception):
    """The enrollment token was used or revoked meanwhile."""


def database_url(data_dir: str | Path, url: str | None) -> str:
    """Return `url`, or the embedded SQLite file inside `data_dir` when none is given."""
    if url:
        return url
    return f"sqlite:///{Path(data_dir).resolve() / 'fedloop.db'}"


def driver_url(url: str) -> str:
    """Return `url` with the psycopg 3 driver named when it says plain `postgresql://`."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _wal_mode(cursor: Any) -> None:
    """Switch the database to WAL, waiting while another process holds it.

    The switch needs the database to itself, and SQLite can answer "database is locked" at once
    instead of waiting (busy_timeout) when another process is just creating or migrating it:
    seen when four processes opened one new database at the same instant.
    """
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # First, so that a second process waits for the lock instead of failing.
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_SECONDS * 1000}")
        # WAL: a crash mid-write rolls back to the last commit; readers never block the writer.
        _wal_mode(cursor)
        # NORMAL, not FULL: in WAL mode a commit is then a write to the WAL file without an
        # fsync (the WAL is fsynced at checkpoints). A commit survives the process being
        # killed (kill -9, OOM: the OS has its pages; tests/faults SIGKILL the aggregator during
        # registration, upload, aggregation and distribution), but the last commits may be lost
        # with power or the OS; the database stays consistent either way. FULL would add an
        # fsync to every upload and every round's close on the aggregator's critical path
        # (measured: median commit 0.3 ms NORMAL, 4.0 ms FULL; docs/performance.md).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _sqlite_explicit_begin(engine: Engine) -> None:
    """Let each transaction say how it BEGINs: ``IMMEDIATE`` for the store's writes.

    pysqlite's own BEGIN is DEFERRED: a write transaction that reads first holds a read
    snapshot and, when another process committed meanwhile, its upgrade to the write lock fails
    at once with "database is locked" — SQLite does not wait (busy_timeout) there, as waiting
    could deadlock. ``BEGIN IMMEDIATE`` takes the write lock first and waits for it instead.
    Reads keep a plain (deferred) BEGIN and never block writers (WAL).
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def alembic_config(url: str | None = None) -> Config:
    """Return an Alembic config for fedloop's migrations (no alembic.ini needed).

    For a new revision: `alembic.command.revision(alembic_config(url), "message",
    autogenerate=True)` against a database at the current head.
    """
    from alembic.config import Config

    config = Config()
    # ConfigParser interpolates `%`; a path or password may contain one.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """Return the newest schema revision this fedloop knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _migration_engine(engine: Engine) -> Engine:
    """Return an engine on the same database whose transactions lock it for one migrator."""
    if engine.dialect.name != "sqlite":
        return engine
    # pysqlite runs DDL outside any transaction and BEGINs lazily; the SQLAlchemy recipe below
    # makes the whole migration one `BEGIN IMMEDIATE` transaction, which takes SQLite's write
    # lock at once, so a second process starting now waits (busy_timeout) and then finds the
    # schema at head.
    migrator = create_engine(engine.url, poolclass=NullPool)
    _sqlite_pragmas(migrator)

    @event.listens_for(migrator, "connect")
    def _autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(migrator, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return migrator


def migrate(engine: Engine) -> None:
    """Bring the database's schema to this fedloop's head revision, in one locked transaction.

    Processes that start on one database at once take turns: SQLite's write lock or a
    PostgreSQL advisory lock is held from before the version check until the commit.
    """
    from alembic import command
    from alembic.migration import MigrationContext

    config = alembic_config()
    migrator = _migration_engine(engine)
    try:
        with migrator.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            before = MigrationContext.configure(connection).get_current_revision()
            existing = before is None and inspect(connection).has_table("agents")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = MigrationContext.configure(connection).get_current_revision()
    finally:
        if migrator is not engine:
            migrator.dispose()
    if existing:
        log.info("database from before migrations adopted as schema revision %s", after)
    elif before is not None and before != after:
        log.info("database schema upgraded from revision %s to %s", before, after)
    elif before is None:
        log.debug("new database created at schema revision %s", after)


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


class Store:
    """The database half of the store; every method is one short transaction."""

    def __init__(self, url: str) -> None:
        from alembic.util import CommandError

        self.url = url
        try:
            self.engine = create_engine(driver_url(url))
        except ArgumentError as exc:
            raise FedloopError(f"database_url {url!r} is not a database URL: {exc}") from exc
        except ImportError as exc:
            raise FedloopError(
                f"the driver for {_shown(url)} is not installed ({exc.name}); "
                "for PostgreSQL run: pip install 'fedloop[postgres]'"
            ) from exc
        self._sqlite = self.engine.dialect.name == "sqlite"
        # The connection of `inline` writes (made on first use), and who holds it.
        self._inline: Any = None
        self._inline_lock = threading.Lock()
        # The placeholder of the driver's own parameter style (`_raw_tx`): sqlite3 and psycopg.
        self._marker = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_local = _insert_sql("local_models", _LOCAL_COLUMNS, self._marker)
        self._insert_global = _insert_sql("global_models", _GLOBAL_COLUMNS, self._marker)
        if self._sqlite:
            _sqlite_pragmas(self.engine)
            _sqlite_explicit_begin(self.engine)
        try:
            migrate(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise FedloopError(
                f"cannot open the database {_shown(url)}: {str(exc.orig).strip()}; "
                "check that its server runs and that the URL, user and password are right"
            ) from exc
        except DBAPIError as exc:
            self.engine.dispose()
            raise FedloopError(
                f"cannot bring the schema of {_shown(url)} up to date: {str(exc.orig).strip()}; "
                "the database may have been changed by hand, or the user may lack rights"
            ) from exc
        except CommandError as exc:
            self.engine.dispose()
            raise FedloopError(
                f"the database {_shown(url)} has a schema this fedloop does not know ({exc}); "
                f"it was written by a newer fedloop, so upgrade fedloop"
            ) from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        with self._inline_lock:
            if self._inline is not None:
                self._inline.close()
                self._inline = None
        self.engine.dispose()

    @property
    def writes_inline(self) -> bool:
        """Whether a short write may run on the caller's thread, an event loop's included
        (``inline=True``). SQLite's commit (WAL, synchronous=NORMAL) is a write to a local file
        without fsync (median 0.3 ms on the reference VM); the thread hop it saves costs
        66–89 µs of CPU there and the wait for two wake-ups (docs/performance.md, eighteenth
        pass). While another connection writes, it waits for the lock like any writer. A
        PostgreSQL commit waits for the server's fsync: never inline."""
        return self._sqlite

    def _inline_connection(self) -> Any:
        """The connection of inline writes: out of the pool, and it never checkpoints the WAL.

        SQLite checkpoints at the commit that finds the WAL past 1,000 pages, with an fsync of
        the database: on an event loop that would stall every connection for the fsync. The
        other connections' commits (each round's close, on a worker thread) checkpoint instead.
        """
        if self._inline is None:
            connection = self.engine.raw_connection()
            connection.detach()  # the pool neither shares nor closes it
            cursor = connection.cursor()
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()
            self._inline = connection
        return self._inline

    @contextmanager
    def _raw_tx(self, inline: bool = False) -> Iterator[Any]:
        """A DBAPI cursor in one transaction, for the writes on every round's critical path
        (an upload's row, a round's close). SQLAlchemy's statement layer cost 0.11 ms of Python
        per upload row against 0.014 ms here, and more under load: deploy 10 × 4 MB took 2 ms
        less of the aggregator's CPU a round (docs/performance.md, eleventh pass). Errors come
        out as SQLAlchemy's (`IntegrityError`, …), as from the other methods. ``inline``: on
        the connection of `_inline_connection` (SQLite only, see `writes_inline`)."""
        if inline:
            if not self._sqlite:
                raise ValueError("only SQLite writes run inline")
            with self._inline_lock, self._raw_tx_on(self._inline_connection(), True) as cursor:
                yield cursor
            return
        with self._raw_tx_on(self.engine.raw_connection(), False) as cursor:
            yield cursor

    @contextmanager
    def _raw_tx_on(self, connection: Any, kept: bool) -> Iterator[Any]:
        """`_raw_tx` on `connection`; closed (back to the pool) at the end unless `kept`."""
        dialect = self.engine.dialect
        error = dialect.loaded_dbapi.Error
        cursor = None
        try:
            cursor = connection.cursor()
            if self._sqlite:  # autocommit mode: the transaction begins when told to
                cursor.execute("BEGIN")
            yield cursor
            connection.commit()
        except error as exc:
            with suppress(error):
                connection.rollback()
            invalidated = dialect.is_disconnect(exc, connection.dbapi_connection, cursor)
            if invalidated and kept:  # a new one next time
                self._inline = None
                with suppress(error):
                    connection.close()
            elif invalidated:  # the pool opens a new connection next time
                connection.invalidate(exc)
            raise DBAPIError.instance(
                None, None, exc, error, connection_invalidated=invalidated, dialect=dialect
            ) from exc
        except BaseException:
            with suppress(error):
                connection.rollback()
            raise
        finally:
            if cursor is not None:
                with suppress(error):
                    cursor.close()
            if not kept:
                connection.close()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            if self._sqlite:  # take the write lock first (see _sqlite_explicit_begin)
                session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
            yield session

    # --- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        with self._sessions() as session:
            row = session.get(MetaRow, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as session:
            self._put_meta(session, key, value)

    def _put_meta(self, session: Session, key: str, value: Any) -> None:
        """INSERT … ON CONFLICT DO UPDATE: one statement, so two processes that set one new key
        at once cannot both insert it (a read-then-write `merge` could, on PostgreSQL)."""
        insert = sqlite_insert if self._sqlite else postgresql_insert
        statement = insert(MetaRow).values(key=key, value=value)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[MetaRow.key], set_={"value": statement.excluded.value}
            )
        )

    # --- agents -------------------------------------------------------------------------
    def agent_by_name(self, name: str) -> AgentRow | None:
        with self._sessions() as session:
            return session.scalars(select(AgentRow).where(AgentRow.name == name)).first()

    def agent(self, agent_id: str) -> AgentRow | None:
        with self._sessions() as session:
            return session.get(AgentRow, agent_id)

    def add_agent(self, agent_id: str, name: str, now: float | None = None) -> AgentRow:
        now = time.time() if now is None else now
        row = AgentRow(id=agent_id, name=name, registered_at=now, last_seen=now)
        with self._tx() as session:
            session.add(row)
        return row

    def agents(self) -> list[AgentRow]:
        with self._sessions() as session:
            return list(session.scalars(select(AgentRow).order_by(AgentRow.registered_at)))

    def touch_agents(self, last_seen: dict[str, float]) -> None:
        if not last_seen:
            return
        # One executemany UPDATE, not an ORM load per agent: this runs every tick.
        with self._tx() as session:
            session.execute(
                update(AgentRow)
                .where(AgentRow.id == bindparam("agent"))
                .values(last_seen=bindparam("seen"))
                .execution_options(synchronize_session=False),
                [{"agent": k, "seen": v} for k, v in last_seen.items()],
            )

    # --- rounds -------------------------------------------------------------------------
    def open_round(self) -> RoundRow | None:
        with self._sessions() as session:
            return session.scalars(
                select(RoundRow)
                .where(RoundRow.closed_at.is_(None))
                .order_by(RoundRow.number.desc())
            ).first()

    def start_round(self, number: int, now: float | None = None) -> RoundRow:
        row = RoundRow(number=number, started_at=time.time() if now is None else now)
        with self._tx() as session:
            session.add(row)
        return row

    def round(self, number: int) -> RoundRow | None:
        with self._sessions() as session:
            return session.get(RoundRow, number)

    # --- local models -------------------------------------------------------------------
    def add_local_model(self, row: LocalModelRow) -> None:
        self.add_local_models([row])

    def add_local_models(self, rows: Sequence[LocalModelRow], inline: bool = False) -> None:
        """Insert the rows in one transaction: all, or none and a DuplicateUpload. ``inline``:
        a write that may run on an event loop (SQLite only, see `writes_inline`)."""
        # On every upload's path: straight to the driver (`_raw_tx`). Writes only, so no BEGIN
        # IMMEDIATE is needed (nothing is read).
        values = [_values(row, _LOCAL_COLUMNS, _LOCAL_JSON) for row in rows]
        try:
            with self._raw_tx(inline) as cursor:
                cursor.executemany(self._insert_local, values)
        except IntegrityError as exc:
            names = ", ".join(sorted({row.agent_id for row in rows}))
            round_number = rows[0].round if rows else 0
            raise DuplicateUpload(f"{names} already uploaded for round {round_number}") from exc

    def drop_local_models(self, ids: Sequence[int]) -> None:
        """Delete the local-model rows `ids` (one transaction): models that cannot be counted
        (their bytes were not kept), so that their agents may send them again."""
        if not ids:
            return
        with self._tx() as session:
            session.execute(
                delete(LocalModelRow)
                .where(LocalModelRow.id.in_(list(ids)))
                .execution_options(synchronize_session=False)
            )

    def local_models(self, round_number: int | None = None) -> list[LocalModelRow]:
        query = select(LocalModelRow).order_by(LocalModelRow.round, LocalModelRow.id)
        if round_number is not None:
            query = query.where(LocalModelRow.round == round_number)
        with self._sessions() as session:
            return list(session.scalars(query))

    # --- global models ------------------------------------------------------------------
    def bootstrap(
        self, meta: dict[str, Any], agent: AgentRow, initial: GlobalModelRow, now: float
    ) -> None:
        """Fix the model, add the first agent, store global model 0 and open round 1: one
        transaction, so a crash leaves either a fresh store or a bootstrapped one."""
        with self._tx() as session:
            for key, value in meta.items():
                self._put_meta(session, key, value)
            session.add(agent)
            session.add(initial)
            session.add(RoundRow(number=1, started_at=now))

    def commit_global(self, row: GlobalModelRow, next_round: int | None, now: float) -> None:
        """Store a global model, close its round and open the next, in one transaction."""
        # Straight to the driver (`_raw_tx`): writes only, so a plain BEGIN takes the write lock
        # at the first INSERT.
        mark = self._marker
        with self._raw_tx() as cursor:
            cursor.execute(self._insert_global, _values(row, _GLOBAL_COLUMNS, _GLOBAL_JSON))
            cursor.execute(
                f"UPDATE rounds SET closed_at = {mark} WHERE number = {mark}", (now, row.round)
            )
            if next_round is not None:
                cursor.execute(
                    f"INSERT INTO rounds (number, started_at) VALUES ({mark}, {mark})",
                    (next_round, now),
                )

    def global_model(self, round_number: int) -> GlobalModelRow | None:
        with self._sessions() as session:
            return session.get(GlobalModelRow, round_number)

    def latest_global(self) -> GlobalModelRow | None:
        with self._sessions() as session:
            return session.scalars(
                select(GlobalModelRow).order_by(GlobalModelRow.round.desc())
            ).first()

    def global_models(self) -> list[GlobalModelRow]:
        with self._sessions() as session:
            return list(session.scalars(select(GlobalModelRow).order_by(GlobalModelRow.round)))

    def set_global_metrics(self, round_number: int, metrics: dict[str, float]) -> None:
        with self._tx() as session:
            row = session.get(GlobalModelRow, round_number)
            if row is not None:
                row.metrics = {**row.metrics, **metrics}

    # --- evaluations --------------------------------------------------------------------
    def add_evaluation(self, agent_id: str, round_number: int, metrics: dict[str, float]) -> None:
        try:
            with self._tx() as session:
                session.add(
                    EvaluationRow(
                        agent_id=agent_id,
                        round=round_number,
                        metrics=metrics,
                        created_at=time.time(),
                    )
                )
        except IntegrityError as exc:
            raise DuplicateUpload(f"{agent_id} already reported round {round_number}") from exc

    def evaluations(self) -> list[EvaluationRow]:
        with self._sessions() as session:
            return list(session.scalars(select(EvaluationRow).order_by(EvaluationRow.round)))

    def referenced_blobs(self) -> set[str]:
        """Every blob id a row names (for orphan and missing-blob checks)."""
        with self._sessions() as session:
            ids = set(session.scalars(select(LocalModelRow.model_id)))
            ids |= set(session.scalars(select(GlobalModelRow.model_id)))
            ids |= {s for s in session.scalars(select(GlobalModelRow.state_id)) if s}
            return ids

    def referenced_among(self, keys: Collection[str]) -> set[str]:
        """Those of the blob ids `keys` that a row names (before deleting any of them)."""
        keys = list(keys)
        if not keys:
            return set()
        with self._sessions() as session:
            ids = set(
                session.scalars(
                    select(LocalModelRow.model_id).where(LocalModelRow.model_id.in_(keys))
                )
            )
            ids |= set(
                session.scalars(
                    select(GlobalModelRow.model_id).where(GlobalModelRow.model_id.in_(keys))
                )
            )
            ids |= set(
                session.scalars(
                    select(GlobalModelRow.state_id).where(GlobalModelRow.state_id.in_(keys))
                )
            )
            return {key for key in ids if key}

    # --- tokens and credentials -----------------------------------------------------------
    def add_token(
        self,
        kind: str,
        name: str,
        secret_hash: str,
        expires_at: float | None = None,
        agent_id: str | None = None,
        now: float | None = None,
    ) -> TokenRow:
        row = TokenRow(
            kind=kind,
            name=name,
            agent_id=agent_id,
            secret_hash=secret_hash,
            created_at=time.time() if now is None else now,
            expires_at=expires_at,
        )
        with self._tx() as session:
            session.add(row)
        return row

    def token_by_hash(self, secret_hash: str) -> TokenRow | None:
        with self._sessions() as session:
            return session.scalars(
                select(TokenRow).where(TokenRow.secret_hash == secret_hash)
            ).first()

    def tokens(self) -> list[TokenRow]:
        with self._sessions() as session:
            return list(session.scalars(select(TokenRow).order_by(TokenRow.id)))

    def revoke_tokens(self, name: str, now: float | None = None) -> int:
        """Revoke every live token and credential bound to `name`; return how many.

        Each revocation also gives the meta key `REVOCATIONS_KEY` a new value, in the same
        transaction: a running aggregator reads that one row to learn that it should look
        again at which agents are revoked (`revoked_agents`)."""
        with self._tx() as session:
            self._put_meta(session, REVOCATIONS_KEY, uuid.uuid4().hex)
            result = session.execute(
                update(TokenRow)
                .where(
                    TokenRow.name == name,
                    TokenRow.revoked_at.is_(None),
                    # A spent enrollment token is dead already; it keeps its "used" record.
                    or_(TokenRow.kind != "enrollment", TokenRow.used_at.is_(None)),
                )
                .values(revoked_at=time.time() if now is None else now)
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def revoked_agents(self) -> set[str]:
        """Return the ids of agents that had a credential and have none left that is not
        revoked: `fedloop token revoke` took them out of the run. (Enrolling again gives an
        agent a new credential, which puts it back.)"""
        query = select(TokenRow.agent_id, TokenRow.revoked_at).where(TokenRow.kind == "credential")
        live: set[str] = set()
        revoked: set[str] = set()
        with self._sessions() as session:
            for agent_id, revoked_at in session.execute(query):
                if agent_id is not None:
                    (live if revoked_at is None else revoked).add(agent_id)
        return revoked - live

    def enroll(
        self,
        token_id: int,
        agent_id: str,
        name: str,
        credential_hash: str,
        now: float,
        new_agent: bool,
    ) -> None:
        """Spend enrollment token `token_id` and give `agent_id` a new credential (its old ones
        revoked), adding the agent itself when `new_agent`: one transaction.

        Raises TokenSpent, changing nothing, when the token was used or revoked meanwhile.
        """
        with self._tx() as session:
            spent = session.execute(
                update(TokenRow)
                .where(
                    TokenRow.id == token_id,
                    TokenRow.used_at.is_(None),
                    TokenRow.revoked_at.is_(None),
                )
                .values(used_at=now, agent_id=agent_id)
                .execution_options(synchronize_session=False)
            )
            if int(getattr(spent, "rowcount", 0) or 0) != 1:
                raise TokenSpent(f"enrollment token {token_id} was used or revoked")
            if new_agent:
                session.add(AgentRow(id=agent_id, name=name, registered_at=now, last_seen=now))
            session.execute(
                update(TokenRow)
                .where(
                    TokenRow.kind == "credential",
                    TokenRow.agent_id == agent_id,
                    TokenRow.revoked_at.is_(None),
                )
                .values(revoked_at=now)
                .execution_options(synchronize_session=False)
            )
            session.add(
                TokenRow(
                    kind="credential",
                    name=name,
                    agent_id=agent_id,
                    secret_hash=credential_hash,
                    created_at=now,
                )
            )

    def count_local_models(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(LocalModelRow)) or 0)
