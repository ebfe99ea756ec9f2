"""`/v1/fine_tuning`: jobs (create, list, get, cancel, start) and fine-tuned model
management (update, archive, unarchive), shaped as the 2026-07-15 spec's JobOut,
DetailedJobOut, JobsOut and CompletionFTModelOut."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError

from sirocco.api.errors import APIError, invalid_model, not_found
from sirocco.api.state import ServerState, get_state
from sirocco.finetune.data import estimate_tokens
from sirocco.finetune.jobs import JobConflict, JobQueue, request_hash
from sirocco.finetune.wandb_runs import INSTALL_HINT, wandb_available
from sirocco.protocol.jobs import (
    ArchiveFTModelOut,
    CheckpointOut,
    CompletionDetailedJobOut,
    CompletionFTModelOut,
    CompletionJobOut,
    EventOut,
    FTModelCapabilitiesOut,
    JobIn,
    JobsOut,
    JobStatus,
    LegacyJobMetadataOut,
    UnarchiveFTModelOut,
    UpdateFTModelIn,
)
from sirocco.protocol.limits import PAGE_MAX, PAGE_SIZE_MAX
from sirocco.serving.registry import ServedModel, UnknownModel
from sirocco.storage.files import FileStore
from sirocco.storage.tables import CheckpointRecord, FineTunedModelRecord, JobEventRecord, JobRecord

router = APIRouter(tags=["fine-tuning"])


def get_jobs(request: Request) -> JobQueue:
    """FastAPI dependency: the job queue."""
    jobs = request.app.state.sirocco.extras.get("jobs")
    if jobs is None:
        raise APIError(503, "fine-tuning is not available on this server", type="unavailable")
    return jobs


def _files(state: ServerState) -> FileStore:
    return state.extras["files"]


# -- wire shapes ---------------------------------------------------------------------------


def job_fields(job: JobRecord) -> dict[str, Any]:
    integrations = None
    if job.integrations is not None:
        integrations = [{"type": "wandb", "project": i["project"], "name": i.get("name"),
                         "run_name": i.get("run_name"), "url": i.get("url")}
                        for i in job.integrations]
    return dict(
        id=job.id, auto_start=job.auto_start, model=job.model, status=job.status,
        created_at=job.created_at, modified_at=job.modified_at,
        training_files=[f["file_id"] for f in job.training_files],
        validation_files=list(job.validation_files), fine_tuned_model=job.fine_tuned_model,
        suffix=job.suffix, integrations=integrations, trained_tokens=job.trained_tokens,
        metadata=job.job_metadata, hyperparameters=job.hyperparameters,
    )


def job_out(job: JobRecord) -> CompletionJobOut:
    return CompletionJobOut(**job_fields(job))


def detailed_job_out(job: JobRecord, events: list[JobEventRecord],
                     checkpoints: list[CheckpointRecord]) -> CompletionDetailedJobOut:
    return CompletionDetailedJobOut(
        **job_fields(job),
        events=[EventOut(name=e.name, data=e.data, created_at=e.created_at) for e in events],
        checkpoints=[CheckpointOut(metrics=c.metrics, step_number=c.step_number,
                                   created_at=c.created_at) for c in checkpoints],
    )


def _details(jobs: JobQueue, job_id: uuid.UUID) -> CompletionDetailedJobOut:
    found = jobs.details(str(job_id))
    if found is None:
        raise not_found("fine-tuning job", str(job_id))
    return detailed_job_out(*found)


def _invalid(loc: list, msg: str, input: Any = None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": tuple(loc), "msg": msg,
                                    "input": input}])


# -- jobs ----------------------------------------------------------------------------------


def _base_model(state: ServerState, name: str) -> ServedModel:
    try:
        served = state.registry.get(name)
    except UnknownModel:
        raise invalid_model(name) from None
    if served.kind != "generate" or served.fine_tuned:
        what = "a fine-tuned model" if served.fine_tuned else f"a {served.kind} model"
        raise APIError(400, f"model {name!r} is {what} and cannot be fine-tuned; pick a base "
                       "chat model", type="invalid_model", param="model")
    return served


def _check_request(body: JobIn, files: FileStore) -> None:
    if body.job_type == "classifier" or body.classifier_targets:
        raise APIError(400, "classifier fine-tuning is not supported by this server; "
                       "use job_type 'completion'", param="job_type")
    if body.integrations and not wandb_available():
        raise APIError(400, "integrations: this server cannot log to Weights & Biases, the "
                       f"wandb package is not installed ({INSTALL_HINT})",
                       param="integrations")
    if body.repositories:
        raise APIError(400, "training on GitHub repositories is not supported by this server "
                       "(it runs offline); upload the data as JSONL files", param="repositories")
    if not body.training_files:
        raise _invalid(["body", "training_files"], "at least one training file is required",
                       [])
    for i, item in enumerate(body.training_files):
        if files.get(item.file_id) is None:
            raise _invalid(["body", "training_files", i, "file_id"],
                           f"file {item.file_id} does not exist; upload it with POST /v1/files",
                           str(item.file_id))
    training_ids = {item.file_id for item in body.training_files}
    for i, file_id in enumerate(body.validation_files or []):
        if files.get(file_id) is None:
            raise _invalid(["body", "validation_files", i],
                           f"file {file_id} does not exist; upload it with POST /v1/files",
                           str(file_id))
        if file_id in training_ids:
            raise _invalid(["body", "validation_files", i],
                           f"file {file_id} is also a training file; validation data must not "
                           "overlap the training data", str(file_id))


def _dry_run(body: JobIn, served: ServedModel, files: FileStore) -> LegacyJobMetadataOut:
    """What the job would do, from the data and the hyperparameters; nothing is created."""
    data_tokens = 0
    for item in body.training_files:
        data_tokens += estimate_tokens(files.path(item.file_id), served.tokenizer)
    hyper = body.hyperparameters.model_dump()
    try:
        from sirocco.finetune.trainer import resolve_hyperparameters
    except ImportError:
        resolve_hyperparameters = None
    if resolve_hyperparameters is not None:
        plan = resolve_hyperparameters(hyper, max(1, data_tokens), served.max_context_length)
        steps, per_step = plan.steps, plan.seq_len * plan.batch_size
    else:
        per_step = min(hyper["seq_len"] or 2048, served.max_context_length)
        steps = hyper["training_steps"] or max(1, -(-int((hyper["epochs"] or 1) * data_tokens)
                                                   // per_step))
    train_tokens = steps * per_step
    epochs = round(train_tokens / data_tokens, 4) if data_tokens else None
    return LegacyJobMetadataOut(
        details=f"dry run, no job created: {data_tokens} tokens of training data, {steps} "
                f"steps of {per_step} tokens on {served.id}. Self-hosted training costs "
                "nothing but local compute time.",
        cost=0.0, cost_currency=None, train_tokens_per_step=per_step, train_tokens=train_tokens,
        data_tokens=data_tokens, epochs=epochs, training_steps=steps,
        expected_duration_seconds=None, estimated_start_time=None,
    )


@router.post("/v1/fine_tuning/jobs", summary="Create a fine-tuning job",
             response_model=CompletionJobOut | LegacyJobMetadataOut)
def create_job(
    body: JobIn,
    state: ServerState = Depends(get_state),
    jobs: JobQueue = Depends(get_jobs),
    dry_run: bool | None = None,
) -> CompletionJobOut | LegacyJobMetadataOut:
    """Queue a LoRA fine-tuning job (or, with `?dry_run=true`, only estimate it)."""
    served = _base_model(state, body.model)
    files = _files(state)
    _check_request(body, files)
    if dry_run:
        return _dry_run(body, served, files)
    request = body.model_dump(mode="json", exclude={"integrations"})
    request["model"] = served.id
    try:
        job = jobs.create(
            model=served.id,
            training_files=[{"file_id": str(f.file_id), "weight": f.weight}
                            for f in body.training_files],
            validation_files=[str(f) for f in body.validation_files or []],
            hyperparameters=body.hyperparameters.model_dump(),
            suffix=body.suffix,
            integrations=[i.model_dump() for i in body.integrations]
            if body.integrations is not None else None,
            auto_start=body.auto_start,
            invalid_sample_skip_percentage=body.invalid_sample_skip_percentage,
            fingerprint=request_hash(request),
        )
    except JobConflict as exc:
        raise APIError(409, str(exc), type="conflict") from None
    worker = state.extras.get("worker")
    if worker is not None:
        worker.wake()
    return job_out(job)


def _timestamp(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


@router.get("/v1/fine_tuning/jobs", response_model=JobsOut, summary="List fine-tuning jobs")
def list_jobs(
    jobs: JobQueue = Depends(get_jobs),
    page: Annotated[int, Query(ge=0, le=PAGE_MAX)] = 0,
    page_size: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX)] = 100,
    model: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    created_by_me: bool = False,  # every job on a self-hosted server is the caller's
    status: JobStatus | None = None,
    wandb_project: str | None = None,
    wandb_name: str | None = None,
    suffix: str | None = None,
) -> JobsOut:
    rows, total = jobs.list(page=page, page_size=page_size, model=model,
                            created_after=_timestamp(created_after),
                            created_before=_timestamp(created_before), status=status,
                            wandb_project=wandb_project, wandb_name=wandb_name, suffix=suffix)
    return JobsOut(data=[job_out(r) for r in rows], total=total)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=CompletionDetailedJobOut,
            summary="Get a fine-tuning job, with its events and checkpoints")
def get_job(job_id: uuid.UUID, jobs: JobQueue = Depends(get_jobs)) -> CompletionDetailedJobOut:
    return _details(jobs, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=CompletionDetailedJobOut,
             summary="Cancel a fine-tuning job")
def cancel_job(job_id: uuid.UUID, jobs: JobQueue = Depends(get_jobs)) -> CompletionDetailedJobOut:
    """Queued and validated jobs are cancelled at once; a running one within seconds."""
    try:
        jobs.request_cancel(str(job_id))
    except KeyError:
        raise not_found("fine-tuning job", str(job_id)) from None
    except JobConflict as exc:
        raise APIError(409, str(exc), type="conflict") from None
    return _details(jobs, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/start", response_model=CompletionDetailedJobOut,
             summary="Start a validated fine-tuning job")
def start_job(job_id: uuid.UUID, request: Request,
              jobs: JobQueue = Depends(get_jobs)) -> CompletionDetailedJobOut:
    """A VALIDATED job goes back to the queue to train (QUEUED until a worker takes it)."""
    try:
        jobs.request_start(str(job_id))
    except KeyError:
        raise not_found("fine-tuning job", str(job_id)) from None
    except JobConflict as exc:
        raise APIError(409, str(exc), type="conflict") from None
    worker = request.app.state.sirocco.extras.get("worker")
    if worker is not None:
        worker.wake()
    return _details(jobs, job_id)


# -- fine-tuned models ---------------------------------------------------------------------


def _fine_tuned(state: ServerState, jobs: JobQueue, model_id: str) -> FineTunedModelRecord:
    record = jobs.get_model(model_id)
    if record is None:
        if model_id in state.registry and not state.registry.get(model_id).fine_tuned:
            raise APIError(400, f"model {model_id!r} is a base model; only fine-tuned models "
                           "can be updated or archived", param="model_id")
        raise not_found("fine-tuned model", model_id)
    return record


def ft_model_out(state: ServerState, record: FineTunedModelRecord) -> CompletionFTModelOut:
    served = state.registry.get(record.id) if record.id in state.registry else None
    caps = served.capabilities if served is not None else None
    return CompletionFTModelOut(
        id=record.id, created=record.created, owned_by=served.owned_by if served else "sirocco",
        workspace_id="default", root=record.root, root_version="1", archived=record.archived,
        name=record.name, description=record.description,
        capabilities=FTModelCapabilitiesOut(
            completion_chat=True,
            completion_fim=bool(caps and caps.completion_fim),
            function_calling=bool(caps and caps.function_calling)),
        max_context_length=served.max_context_length if served else 32768,
        aliases=list(served.aliases) if served else [], job=record.job_id,
    )


def _sync_served(state: ServerState, record: FineTunedModelRecord) -> None:
    if record.id in state.registry:
        served = state.registry.get(record.id)
        served.name = record.name
        if record.description is not None:
            served.description = record.description
        served.archived = record.archived


@router.patch("/v1/fine_tuning/models/{model_id:path}", response_model=CompletionFTModelOut,
              summary="Update a fine-tuned model's name or description")
def update_model(model_id: str, body: UpdateFTModelIn, state: ServerState = Depends(get_state),
                 jobs: JobQueue = Depends(get_jobs)) -> CompletionFTModelOut:
    _fine_tuned(state, jobs, model_id)
    record = jobs.update_model(model_id, **body.model_dump(exclude_unset=True))
    assert record is not None
    _sync_served(state, record)
    return ft_model_out(state, record)


def _set_archived(state: ServerState, jobs: JobQueue, model_id: str, archived: bool) -> None:
    _fine_tuned(state, jobs, model_id)
    record = jobs.update_model(model_id, archived=archived)
    assert record is not None
    _sync_served(state, record)


@router.post("/v1/fine_tuning/models/{model_id:path}/archive", response_model=ArchiveFTModelOut,
             summary="Archive a fine-tuned model")
def archive_model(model_id: str, state: ServerState = Depends(get_state),
                  jobs: JobQueue = Depends(get_jobs)) -> ArchiveFTModelOut:
    _set_archived(state, jobs, model_id, True)
    return ArchiveFTModelOut(id=model_id)


@router.delete("/v1/fine_tuning/models/{model_id:path}/archive",
               response_model=UnarchiveFTModelOut, summary="Unarchive a fine-tuned model")
def unarchive_model(model_id: str, state: ServerState = Depends(get_state),
                    jobs: JobQueue = Depends(get_jobs)) -> UnarchiveFTModelOut:
    _set_archived(state, jobs, model_id, False)
    return UnarchiveFTModelOut(id=model_id)



