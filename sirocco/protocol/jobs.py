"""Wire shapes of the fine-tuning API, from the 2026-07-15 spec (the last with jobs):
`JobIn`, `CompletionJobOut` / `CompletionDetailedJobOut`, `JobsOut`,
`LegacyJobMetadataOut` (dry runs) and the fine-tuned model management bodies.

Request bodies forbid unknown fields (422 `extra_forbidden`), like the real API.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sirocco.protocol.limits import (
    EPOCHS_MAX,
    FILE_WEIGHT_MAX,
    SEQ_LEN_MAX,
    TRAINING_STEPS_MAX,
    reject_lone_surrogates,
)

JobStatus = Literal[
    "QUEUED", "STARTED", "VALIDATING", "VALIDATED", "RUNNING", "FAILED_VALIDATION", "FAILED",
    "SUCCESS", "CANCELLED", "CANCELLATION_REQUESTED",
]

#: The contract's hyperparameter defaults (`CompletionTrainingParametersIn`).
HYPERPARAMETER_DEFAULTS: dict[str, Any] = {
    "training_steps": None,
    "learning_rate": 0.0001,
    "weight_decay": 0.1,
    "warmup_fraction": 0.05,
    "epochs": None,
    "seq_len": None,
    "fim_ratio": 0.9,
}


class _Strict(BaseModel):
    # allow_inf_nan: Python's JSON parser reads NaN and Infinity; no field takes them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Body(_Strict):
    """A request body: its strings are valid Unicode (SQLite stores them as UTF-8)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return reject_lone_surrogates(data, cls.__name__)


class TrainingFile(_Strict):
    file_id: UUID = Field(description="an uploaded file's id")
    weight: float = Field(1.0, gt=0, le=FILE_WEIGHT_MAX)


class WandbIntegration(_Strict):
    """A W&B project that gets a run with the job's metrics while it trains (see
    `sirocco.finetune.wandb_runs`)."""

    type: Literal["wandb"] = "wandb"
    # W&B's own rule for project names, checked here rather than when training starts.
    project: str = Field(min_length=1, max_length=128, pattern=r"^[^/\\#?%:]+$")
    name: str | None = None
    api_key: str = Field(min_length=40, max_length=40)
    run_name: str | None = None


class CompletionTrainingParametersIn(_Strict):
    training_steps: int | None = Field(None, ge=1, le=TRAINING_STEPS_MAX)
    learning_rate: float = Field(0.0001, ge=1e-8, le=1)
    weight_decay: float | None = Field(0.1, ge=0, le=1)
    warmup_fraction: float | None = Field(0.05, ge=0, le=1)
    epochs: float | None = Field(None, gt=0, le=EPOCHS_MAX)
    seq_len: int | None = Field(None, ge=100, le=SEQ_LEN_MAX)
    fim_ratio: float | None = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> CompletionTrainingParametersIn:
        if self.training_steps is not None and self.epochs is not None:
            raise ValueError("give training_steps or epochs, not both")
        return self


class GithubRepositoryIn(_Strict):
    type: Literal["github"] = "github"
    name: str
    owner: str
    ref: str | None = None
    weight: float = Field(1.0, gt=0, le=FILE_WEIGHT_MAX)
    token: str


class JobIn(_Body):
    """`POST /v1/fine_tuning/jobs` body."""

    model: str
    training_files: list[TrainingFile] = Field(default_factory=list)
    validation_files: list[UUID] | None = None
    suffix: str | None = Field(None, max_length=18)
    integrations: list[WandbIntegration] | None = None
    auto_start: bool = False  # the docs' default: the job waits in VALIDATED for /start
    invalid_sample_skip_percentage: float = Field(0.0, ge=0, le=0.5)
    job_type: Literal["completion", "classifier"] | None = None
    hyperparameters: CompletionTrainingParametersIn
    repositories: list[GithubRepositoryIn] | None = None
    classifier_targets: list[dict[str, Any]] | None = None


class WandbIntegrationOut(BaseModel):
    type: Literal["wandb"] = "wandb"
    project: str
    name: str | None = None
    run_name: str | None = None
    url: str | None = None


class JobMetadataOut(BaseModel):
    expected_duration_seconds: int | None = None
    cost: float | None = None
    cost_currency: str | None = None
    train_tokens_per_step: int | None = None
    train_tokens: int | None = None
    data_tokens: int | None = None
    estimated_start_time: int | None = None


class CompletionTrainingParameters(BaseModel):
    training_steps: int | None = None
    learning_rate: float = 0.0001
    weight_decay: float | None = 0.1
    warmup_fraction: float | None = 0.05
    epochs: float | None = None
    seq_len: int | None = None
    fim_ratio: float | None = 0.9


class CompletionJobOut(BaseModel):
    """A job as listed and as created."""

    id: str
    auto_start: bool
    model: str
    status: JobStatus
    created_at: int
    modified_at: int
    training_files: list[str]
    validation_files: list[str] | None = Field(default_factory=list)
    object: Literal["job"] = "job"
    fine_tuned_model: str | None = None
    suffix: str | None = None
    integrations: list[WandbIntegrationOut] | None = None
    trained_tokens: int | None = None
    metadata: JobMetadataOut | None = None
    job_type: Literal["completion"] = "completion"
    hyperparameters: CompletionTrainingParameters
    repositories: list[dict[str, Any]] = Field(default_factory=list)


class EventOut(BaseModel):
    name: str
    data: dict[str, Any] | None = None
    created_at: int


class MetricOut(BaseModel):
    train_loss: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class CheckpointOut(BaseModel):
    metrics: MetricOut
    step_number: int
    created_at: int


class CompletionDetailedJobOut(CompletionJobOut):
    """A job with its events and checkpoints, newest first."""

    events: list[EventOut] = Field(default_factory=list)
    checkpoints: list[CheckpointOut] = Field(default_factory=list)


class JobsOut(BaseModel):
    data: list[CompletionJobOut] = Field(default_factory=list)
    object: Literal["list"] = "list"
    total: int


class LegacyJobMetadataOut(JobMetadataOut):
    """The answer to a dry run: what the job would cost, without creating it."""

    deprecated: bool = True
    details: str
    epochs: float | None = None
    training_steps: int | None = None
    object: Literal["job.metadata"] = "job.metadata"


class UpdateFTModelIn(_Body):
    name: str | None = None
    description: str | None = None


class FTModelCapabilitiesOut(BaseModel):
    completion_chat: bool = True
    completion_fim: bool = False
    function_calling: bool = False
    fine_tuning: bool = False
    classification: bool = False


class CompletionFTModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    workspace_id: str
    root: str
    root_version: str
    archived: bool
    name: str | None = None
    description: str | None = None
    capabilities: FTModelCapabilitiesOut
    max_context_length: int = 32768
    aliases: list[str] = Field(default_factory=list)
    job: str
    model_type: Literal["completion"] = "completion"


class ArchiveFTModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    archived: bool = True


class UnarchiveFTModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    archived: bool = False
