"""The metadata tables: files, fine-tuning jobs with their events and checkpoints, and
fine-tuned models. Blobs (file contents, adapters) live on disk, not here.

The schema is owned by the Alembic migrations in `migrations/versions/`; a change here
needs a new migration there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of Sirocco's tables."""


class FileRecord(Base):
    """One uploaded file; its bytes are the blob named after `id` (a hard link when another
    file holds the same bytes)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    filename: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(32))
    sample_type: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32), default="upload")
    num_lines: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mimetype: Mapped[str | None] = mapped_column(String(255), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    visibility: Mapped[str] = mapped_column(String(16), default="workspace")
    created_at: Mapped[int] = mapped_column(Integer)
    created_time: Mapped[float] = mapped_column(Float)  # sub-second order of listings
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_files_dedupe", "filename", "sha256"),)


class JobRecord(Base):
    """One fine-tuning job; `status` is the queue (see `sirocco.finetune.jobs`)."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_type: Mapped[str] = mapped_column(String(16), default="completion")
    model: Mapped[str] = mapped_column(String(255))  # the base model's served id
    status: Mapped[str] = mapped_column(String(32), index=True)
    auto_start: Mapped[bool] = mapped_column(Boolean)
    validated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(Integer)
    modified_at: Mapped[int] = mapped_column(Integer)
    queued_at: Mapped[float] = mapped_column(Float)  # claim order
    training_files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{file_id, weight}]
    validation_files: Mapped[list[str]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    invalid_sample_skip_percentage: Mapped[float] = mapped_column(Float, default=0.0)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64), index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEventRecord(Base):
    """Something that happened to a job: a status change, a validation error, progress."""

    __tablename__ = "fine_tuning_job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)


class CheckpointRecord(Base):
    """Metrics the trainer reported at one step."""

    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer)


class FineTunedModelRecord(Base):
    """A model a job produced: a LoRA adapter on top of its `root` base model."""

    __tablename__ = "fine_tuned_models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    root: Mapped[str] = mapped_column(String(255))
    adapter_dir: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[int] = mapped_column(Integer)
