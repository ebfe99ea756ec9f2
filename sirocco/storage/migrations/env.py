"""Alembic environment: Sirocco runs migrations itself, on the connection it opened
(`sirocco.storage.database.upgrade`), so only the online mode is supported."""

from __future__ import annotations

from alembic import context

from sirocco.storage.tables import Base

config = context.config
target_metadata = Base.metadata

connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run Sirocco's migrations through sirocco.storage.database.upgrade()")

context.configure(connection=connection, target_metadata=target_metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
