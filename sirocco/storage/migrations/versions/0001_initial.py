"""Files, fine-tuning jobs, job events, checkpoints and fine-tuned models.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("sample_type", sa.String(32), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("num_lines", sa.Integer(), nullable=True),
        sa.Column("mimetype", sa.String(255), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("visibility", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("created_time", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Integer(), nullable=True),
    )
    op.create_index("ix_files_dedupe", "files", ["filename", "sha256"])
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_type", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("auto_start", sa.Boolean(), nullable=False),
        sa.Column("validated", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("modified_at", sa.Integer(), nullable=False),
        sa.Column("queued_at", sa.Float(), nullable=False),
        sa.Column("training_files", sa.JSON(), nullable=False),
        sa.Column("validation_files", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("integrations", sa.JSON(), nullable=True),
        sa.Column("invalid_sample_skip_percentage", sa.Float(), nullable=False),
        sa.Column("fine_tuned_model", sa.String(255), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("job_metadata", sa.JSON(), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_fine_tuning_jobs_status", "fine_tuning_jobs", ["status"])
    op.create_index("ix_fine_tuning_jobs_request_hash", "fine_tuning_jobs", ["request_hash"])
    op.create_table(
        "fine_tuning_job_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36),
                  sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
    )
    op.create_index("ix_fine_tuning_job_events_job_id", "fine_tuning_job_events", ["job_id"])
    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36),
                  sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
    )
    op.create_index("ix_fine_tuning_checkpoints_job_id", "fine_tuning_checkpoints", ["job_id"])
    op.create_table(
        "fine_tuned_models",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("root", sa.String(255), nullable=False),
        sa.Column("adapter_dir", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
    )
    op.create_index("ix_fine_tuned_models_job_id", "fine_tuned_models", ["job_id"])


def downgrade() -> None:
    op.drop_table("fine_tuned_models")
    op.drop_table("fine_tuning_checkpoints")
    op.drop_table("fine_tuning_job_events")
    op.drop_table("fine_tuning_jobs")
    op.drop_table("files")
