"""Durable state: the metadata database (SQLAlchemy + Alembic) and the blob store."""
