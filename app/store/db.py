"""The database every store shares: one SQLAlchemy engine, migrated with Alembic when it is opened.

The default is an SQLite file in the data directory (WAL, so readers never wait for the writer); a
``postgresql://`` URL puts the same tables, queries and migrations on PostgreSQL for several gateway replicas.
Queries are SQLAlchemy Core statements, so one text serves both engines; the blocking calls run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"


def url_for(target: str | Path) -> str:
    """An SQLAlchemy URL for a URL or the path of an SQLite file."""
    text = str(target)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


def _sqlite(engine: Engine) -> None:
    """WAL and write transactions that take the lock at BEGIN (no deadlock between two would-be writers)."""

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's events below decide where transactions begin
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """An engine plus the two ways the stores use it: write transactions in threads, and quick reads in place.

    Args:
        target: an SQLAlchemy URL, or the path of an SQLite file (created with its directory).
    """

    def __init__(self, target: str | Path) -> None:
        self.url = url_for(target)
        self.sqlite = self.url.startswith("sqlite")
        if self.sqlite:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"check_same_thread": False})
            _sqlite(self.engine)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        # SQLite allows one writer at a time: writers of this process queue on a lock, not on the busy timeout.
        self._write_lock = threading.Lock() if self.sqlite else contextlib.nullcontext()
        migrate(self.engine)
        # Lookups made on every request (keys, their version) run on the event loop through a connection of their
        # own in autocommit mode: each read sees the latest commit, and an indexed read costs less than a thread hop.
        self.reader = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._raw = self.reader.connection.dbapi_connection.cursor() if self.sqlite else None

    def data_version(self) -> int | None:
        """A number that moves with every commit of any other connection; None where the engine has none.

        On SQLite this is ``PRAGMA data_version`` on the reader's connection: this process's writers and other
        processes alike move it, and it costs a few microseconds where a query through SQLAlchemy costs a hundred.
        """
        if self._raw is None:
            return None
        self._raw.execute("PRAGMA data_version")
        return self._raw.fetchone()[0]

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction: committed whole when the block ends, rolled back whole if it raises."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def write(self, work: Callable[[Connection], T]) -> T:
        with self.begin() as conn:
            return work(conn)

    def read(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return work(conn)

    async def awrite(self, work: Callable[[Connection], T]) -> T:
        return await asyncio.to_thread(self.write, work)

    async def aread(self, work: Callable[[Connection], T]) -> T:
        return await asyncio.to_thread(self.read, work)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        self.reader.close()
        self.engine.dispose()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
