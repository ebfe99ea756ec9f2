"""Fine-tuning jobs: the queue in the database and the status machine.

Statuses move QUEUED -> VALIDATING -> VALIDATED -> RUNNING -> SUCCESS, or end in
FAILED_VALIDATION, FAILED, or CANCELLATION_REQUESTED -> CANCELLED. A job with
`auto_start: false` rests in VALIDATED until `/start` puts it back in the queue (already
validated, so the next claim goes straight to RUNNING). Every status change is an atomic
`UPDATE ... WHERE status IN (...)` plus a `status-updated` event, so the API and any number
of workers can race on a job and exactly one of them wins each step.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from sirocco.storage.database import Database
from sirocco.storage.tables import (
    CheckpointRecord,
    FineTunedModelRecord,
    JobEventRecord,
    JobRecord,
)

QUEUED, VALIDATING, VALIDATED, RUNNING = "QUEUED", "VALIDATING", "VALIDATED", "RUNNING"
SUCCESS, FAILED, FAILED_VALIDATION = "SUCCESS", "FAILED", "FAILED_VALIDATION"
CANCELLATION_REQUESTED, CANCELLED = "CANCELLATION_REQUESTED", "CANCELLED"
#: Statuses a job can still leave.
ACTIVE = (QUEUED, VALIDATING, VALIDATED, RUNNING, CANCELLATION_REQUESTED)
#: Statuses in which a worker holds the job.
CLAIMED = (VALIDATING, RUNNING, CANCELLATION_REQUESTED)
#: Restarts a training job survives (resuming each time) before it is FAILED.
MAX_INTERRUPTIONS = 3


class JobConflict(Exception):
    """The job is not in a status that allows what was asked; the message says why."""


def _now() -> int:
    return int(time.time())


def fine_tuned_model_id(base: str, suffix: str | None, created_at: int, job_id: str) -> str:
    """`ft:<base>:<suffix or 8 hex>:<YYYYMMDD>:<first 8 hex of the job id>`."""
    middle = suffix or secrets.token_hex(4)
    day = datetime.fromtimestamp(created_at, UTC).strftime("%Y%m%d")
    return f"ft:{base}:{middle}:{day}:{job_id.replace('-', '')[:8]}"


def request_hash(body: dict[str, Any]) -> str:
    """Identity of a job request, to refuse an exact duplicate of an active job (409)."""
    import hashlib

    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobQueue:
    """Jobs, their events and checkpoints, and fine-tuned model rows, in the database."""

    def __init__(self, database: Database) -> None:
        self.db = database

    # -- creation and reads ----------------------------------------------------------

    def create(self, *, model: str, training_files: list[dict[str, Any]],
               validation_files: list[str], hyperparameters: dict[str, Any],
               suffix: str | None, integrations: list[dict[str, Any]] | None,
               auto_start: bool, invalid_sample_skip_percentage: float,
               fingerprint: str) -> JobRecord:
        """A new QUEUED job; `JobConflict` if an identical request is still active."""
        now = _now()
        job = JobRecord(
            id=str(uuid.uuid4()), job_type="completion", model=model, status=QUEUED,
            auto_start=auto_start, validated=False, created_at=now, modified_at=now,
            queued_at=time.time(), training_files=training_files,
            validation_files=validation_files, hyperparameters=hyperparameters, suffix=suffix,
            integrations=integrations,
            invalid_sample_skip_percentage=invalid_sample_skip_percentage,
            request_hash=fingerprint,
        )
        with self.db.session() as s:
            twin = s.scalars(select(JobRecord.id).where(
                JobRecord.request_hash == fingerprint, JobRecord.status.in_(ACTIVE))).first()
            if twin is not None:
                raise JobConflict(f"an identical job ({twin}) is already queued, validated or "
                                  "running; cancel it or change the request")
            s.add(job)
            s.flush()
            self._event(s, job.id, "status-updated", {"status": QUEUED})
        return job

    def get(self, job_id: str) -> JobRecord | None:
        with self.db.session() as s:
            return s.get(JobRecord, job_id)

    def details(self, job_id: str) -> tuple[JobRecord, list[JobEventRecord],
                                            list[CheckpointRecord]] | None:
        """The job, its events and its checkpoints, newest first."""
        with self.db.session() as s:
            job = s.get(JobRecord, job_id)
            if job is None:
                return None
            events = list(s.scalars(select(JobEventRecord).where(JobEventRecord.job_id == job_id)
                                    .order_by(JobEventRecord.id.desc())))
            checkpoints = list(s.scalars(
                select(CheckpointRecord).where(CheckpointRecord.job_id == job_id)
                .order_by(CheckpointRecord.step_number.desc(), CheckpointRecord.id.desc())))
        return job, events, checkpoints

    def list(self, *, page: int = 0, page_size: int = 100, model: str | None = None,
             created_after: int | None = None, created_before: int | None = None,
             status: str | None = None, wandb_project: str | None = None,
             wandb_name: str | None = None, suffix: str | None = None,
             ) -> tuple[list[JobRecord], int]:
        """One page of jobs, newest first, and how many match in all."""
        query = select(JobRecord)
        if model:
            query = query.where(JobRecord.model == model)
        if created_after is not None:
            query = query.where(JobRecord.created_at >= created_after)
        if created_before is not None:
            query = query.where(JobRecord.created_at <= created_before)
        if status:
            query = query.where(JobRecord.status == status)
        if suffix:
            query = query.where(JobRecord.suffix == suffix)
        query = query.order_by(JobRecord.created_at.desc(), JobRecord.queued_at.desc())
        with self.db.session() as s:
            if not (wandb_project or wandb_name):
                total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
                rows = list(s.scalars(query.offset(page * page_size).limit(page_size)))
                return rows, total
            rows = list(s.scalars(query))
        # integrations are JSON, which the databases query differently: filter here
        rows = [r for r in rows if any(
            (not wandb_project or i.get("project") == wandb_project)
            and (not wandb_name or i.get("name") == wandb_name)
            for i in (r.integrations or []))]
        return rows[page * page_size:(page + 1) * page_size], len(rows)

    # -- status machine --------------------------------------------------------------

    def _event(self, s: Session, job_id: str, name: str, data: dict[str, Any] | None) -> None:
        s.add(JobEventRecord(job_id=job_id, name=name, data=data, created_at=_now()))

    def add_event(self, job_id: str, name: str, data: dict[str, Any] | None = None) -> None:
        with self.db.session() as s:
            self._event(s, job_id, name, data)

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self.db.session() as s:
            s.add(CheckpointRecord(job_id=job_id, step_number=step, metrics=metrics,
                                   created_at=_now()))

    def _move(self, s: Session, job_id: str, sources: Iterable[str], target: str,
              event_data: dict[str, Any] | None = None, **values: Any) -> bool:
        moved = s.execute(
            update(JobRecord).where(JobRecord.id == job_id, JobRecord.status.in_(list(sources)))
            .values(status=target, modified_at=_now(), **values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if moved:
            self._event(s, job_id, "status-updated", {"status": target, **(event_data or {})})
        return bool(moved)

    def transition(self, job_id: str, sources: Iterable[str], target: str,
                   event_data: dict[str, Any] | None = None, **values: Any) -> bool:
        """Move the job to `target` if it is in one of `sources`; False if it was not."""
        with self.db.session() as s:
            return self._move(s, job_id, sources, target, event_data, **values)

    def status(self, job_id: str) -> str | None:
        with self.db.session() as s:
            return s.scalar(select(JobRecord.status).where(JobRecord.id == job_id))

    def claim(self, worker_id: str) -> JobRecord | None:
        """Take the oldest QUEUED job for `worker_id`, or None.

        On PostgreSQL the candidate row is locked with `FOR UPDATE SKIP LOCKED`, so
        workers never wait on each other; on SQLite the `WHERE status = 'QUEUED'` of the
        update is the lock. Either way one claim wins.
        """
        with self.db.session() as s:
            candidate = s.scalars(
                select(JobRecord.id).where(JobRecord.status == QUEUED)
                .order_by(JobRecord.queued_at).limit(1).with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            validated = s.scalar(select(JobRecord.validated).where(JobRecord.id == candidate))
            target = RUNNING if validated else VALIDATING
            if not self._move(s, candidate, [QUEUED], target, claimed_by=worker_id,
                              heartbeat_at=time.time()):
                return None
        return self.get(candidate)

    def release(self, job_id: str, worker_id: str) -> None:
        """`worker_id` lets go of a job that now waits in VALIDATED for /start."""
        with self.db.session() as s:
            s.execute(update(JobRecord).where(JobRecord.id == job_id,
                                              JobRecord.status == VALIDATED,
                                              JobRecord.claimed_by == worker_id)
                      .values(claimed_by=None, heartbeat_at=None))

    def set_integration_urls(self, job_id: str, urls: dict[int, str]) -> None:
        """Record the page of the W&B run of each integration (by index)."""
        with self.db.session() as s:
            job = s.get(JobRecord, job_id)
            if job is None or not job.integrations:
                return
            job.integrations = [{**item, "url": urls[i]} if i in urls else item
                                for i, item in enumerate(job.integrations)]

    def set_metadata(self, job_id: str, metadata: dict[str, Any]) -> None:
        with self.db.session() as s:
            s.execute(update(JobRecord).where(JobRecord.id == job_id)
                      .values(job_metadata=metadata))

    def complete(self, job_id: str, model: FineTunedModelRecord,
                 trained_tokens: int | None) -> bool:
        """RUNNING -> SUCCESS and the fine-tuned model's row, in one transaction; False
        (and nothing written) if the job is no longer RUNNING."""
        with self.db.session() as s:
            if not self._move(s, job_id, [RUNNING], SUCCESS, claimed_by=None,
                              fine_tuned_model=model.id, trained_tokens=trained_tokens,
                              event_data={"fine_tuned_model": model.id}):
                return False
            s.add(model)
        return True

    def heartbeat(self, job_id: str) -> None:
        with self.db.session() as s:
            s.execute(update(JobRecord).where(JobRecord.id == job_id)
                      .values(heartbeat_at=time.time()))

    def _current(self, job_id: str) -> str:
        status = self.status(job_id)
        if status is None:
            raise KeyError(job_id)
        return status

    def request_cancel(self, job_id: str) -> None:
        """Cancel at once a job no worker holds; ask the worker to stop one it holds."""
        for _ in range(10):  # each try is one conditional update; a lost race reads again
            status = self._current(job_id)
            if status == CANCELLATION_REQUESTED:
                return
            with self.db.session() as s:
                if status in (QUEUED, VALIDATED):
                    if self._move(s, job_id, [status], CANCELLATION_REQUESTED):
                        self._move(s, job_id, [CANCELLATION_REQUESTED], CANCELLED,
                                   claimed_by=None)
                        return
                elif status in (VALIDATING, RUNNING):
                    if self._move(s, job_id, [status], CANCELLATION_REQUESTED):
                        return
                else:
                    raise JobConflict(f"job {job_id} is {status} and can no longer be "
                                      "cancelled")
        raise JobConflict(f"job {job_id} is changing status too fast to cancel; try again")

    def request_start(self, job_id: str) -> None:
        """Start a validated job (back into the queue, validated); a job still being
        queued or validated will start as soon as it is valid."""
        for _ in range(10):
            status = self._current(job_id)
            with self.db.session() as s:
                if status == VALIDATED:
                    if self._move(s, job_id, [VALIDATED], QUEUED, event_data={"started": True},
                                  queued_at=time.time(), auto_start=True, claimed_by=None):
                        return
                elif status in (QUEUED, VALIDATING):
                    updated = s.execute(
                        update(JobRecord).where(JobRecord.id == job_id,
                                                JobRecord.status == status)
                        .values(auto_start=True, modified_at=_now())).rowcount
                    if updated:
                        return
                else:
                    raise JobConflict(f"job {job_id} is {status}; only a VALIDATED job can be "
                                      "started")
        raise JobConflict(f"job {job_id} is changing status too fast to start; try again")

    def recover(self, is_dead: Any) -> list[str]:
        """After a restart: jobs whose worker is gone (`is_dead(claimed_by, heartbeat_at)`)
        are settled. Validation is redone (QUEUED). A RUNNING job goes back to the queue,
        already validated, and its training resumes from its last checkpoint; after
        MAX_INTERRUPTIONS it is FAILED instead (something keeps killing the process). A
        cancellation in flight completes."""
        settled = []
        with self.db.session() as s:
            jobs = list(s.scalars(select(JobRecord).where(JobRecord.status.in_(CLAIMED))))
            for job in jobs:
                if not is_dead(job.claimed_by, job.heartbeat_at):
                    continue
                if job.status == VALIDATING:
                    self._move(s, job.id, [VALIDATING], QUEUED, claimed_by=None,
                               event_data={"reason": "validation restarted after a restart"})
                elif job.status == RUNNING:
                    interruptions = 1 + (s.scalar(
                        select(func.count()).select_from(JobEventRecord).where(
                            JobEventRecord.job_id == job.id,
                            JobEventRecord.name == "training-interrupted")) or 0)
                    self._event(s, job.id, "training-interrupted", {
                        "error": "the server process stopped while this job was training "
                                 "(crash or shutdown)", "interruptions": interruptions})
                    if interruptions > MAX_INTERRUPTIONS:
                        self._event(s, job.id, "job-failed", {
                            "error": f"training was interrupted {interruptions} times"})
                        self._move(s, job.id, [RUNNING], FAILED, claimed_by=None)
                    else:
                        self._move(s, job.id, [RUNNING], QUEUED, claimed_by=None,
                                   validated=True,
                                   event_data={"reason": "training resumes from its last "
                                                         "checkpoint after a restart"})
                else:
                    self._move(s, job.id, [CANCELLATION_REQUESTED], CANCELLED, claimed_by=None)
                settled.append(job.id)
        return settled

    # -- fine-tuned models -----------------------------------------------------------

    def add_model(self, record: FineTunedModelRecord) -> None:
        with self.db.session() as s:
            s.add(record)

    def models(self) -> list[FineTunedModelRecord]:
        with self.db.session() as s:
            return list(s.scalars(select(FineTunedModelRecord)
                                  .order_by(FineTunedModelRecord.created)))

    def get_model(self, model_id: str) -> FineTunedModelRecord | None:
        with self.db.session() as s:
            return s.get(FineTunedModelRecord, model_id)

    def update_model(self, model_id: str, **values: Any) -> FineTunedModelRecord | None:
        with self.db.session() as s:
            record = s.get(FineTunedModelRecord, model_id)
            if record is None:
                return None
            for key, value in values.items():
                setattr(record, key, value)
        return record

    def delete_model(self, model_id: str) -> FineTunedModelRecord | None:
        with self.db.session() as s:
            record = s.get(FineTunedModelRecord, model_id)
            if record is not None:
                s.execute(delete(FineTunedModelRecord)
                          .where(FineTunedModelRecord.id == model_id))
        return record

    def count(self) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(JobRecord)) or 0
