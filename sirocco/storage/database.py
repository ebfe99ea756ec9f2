"""The metadata database: one SQLAlchemy engine, sessions, and schema migrations.

SQLite in the data dir by default (WAL journal, so readers never wait for the writer),
or any SQLAlchemy URL given with `--database-url` (PostgreSQL for several API replicas).
The schema is brought to the newest Alembic revision every time the server starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir) / 'sirocco.db'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Database:
    """An engine plus a session factory; `session()` is the one way to talk to it."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict = {}
        if url.startswith("sqlite"):
            # The API's thread pool and the job worker share connections across threads.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (`alembic upgrade head`)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str | None, data_dir: Path) -> Database:
    """Open (and migrate) the database at `url`, or SQLite in `data_dir` when None."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    database = Database(url or default_database_url(data_dir))
    database.upgrade()
    log.info("database: %s (%s)", database.engine.url.render_as_string(hide_password=True),
             database.dialect)
    return database
