"""The job worker: claims jobs from the database queue, validates their data, and trains
them in a separate process so the API and the inference engine stay responsive.

One worker runs in each `sirocco serve` process and trains one job at a time; more
workers (other replicas on a shared PostgreSQL) claim other jobs. Training runs in a child
process started with `multiprocessing` spawn: it calls `train(spec, reporter)` (by default
`sirocco.finetune.trainer:train`; `SIROCCO_FINETUNE_TRAINER=module:function` swaps in
another, which the tests use), and its reporter sends events, checkpoints and the result
back over a queue. Cancellation sets a stop event the trainer polls at every step; a
trainer that does not stop within `cancel_grace` seconds is terminated.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import queue as queue_module
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sirocco.finetune.data import FileReport, validate_file, write_valid_lines
from sirocco.finetune.jobs import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    FAILED,
    FAILED_VALIDATION,
    QUEUED,
    RUNNING,
    VALIDATED,
    VALIDATING,
    JobQueue,
    fine_tuned_model_id,
)
from sirocco.finetune.wandb_runs import WandbRuns
from sirocco.models.lora import LoRAError
from sirocco.protocol.models import ModelCapabilities
from sirocco.serving.registry import ModelRegistry, ServedModel, UnknownModel
from sirocco.storage.files import FileStore
from sirocco.storage.tables import FineTunedModelRecord, JobRecord

log = logging.getLogger(__name__)

TRAINER_ENV = "SIROCCO_FINETUNE_TRAINER"
DEFAULT_TRAINER = "sirocco.finetune.trainer:train"
#: A claimed job whose heartbeat is older than this belongs to a dead worker.
STALE_AFTER_S = 60.0
HEARTBEAT_EVERY_S = 5.0


# -- the training process ----------------------------------------------------------------


@dataclass
class _FallbackTrainSpec:
    """`TrainSpec`'s fields, for a trainer module that does not define the class."""

    base_model_dir: Path
    training_files: list[tuple[Path, float]]
    validation_files: list[Path]
    hyperparameters: dict
    output_dir: Path
    seed: int = 0


class _ProcessReporter:
    """The trainer's `Reporter` in the child: messages to the worker, stop from an Event."""

    def __init__(self, messages: Any, stop: Any) -> None:
        self._messages = messages
        self._stop = stop

    def event(self, name: str, data: dict) -> None:
        self._messages.put(("event", str(name), dict(data or {})))

    def checkpoint(self, step: int, metrics: dict) -> None:
        self._messages.put(("checkpoint", int(step), dict(metrics or {})))

    def should_stop(self) -> bool:
        return self._stop.is_set()


def _exit_with_parent(parent_pid: int) -> None:
    """A training process must not outlive its server (a SIGKILLed server included)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def run_training_process(trainer_path: str, spec: dict[str, Any], messages: Any, stop: Any,
                         parent_pid: int) -> None:
    """Entry point of the spawned training process."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        module_name, _, func_name = trainer_path.partition(":")
        module = importlib.import_module(module_name)
        train = getattr(module, func_name or "train")
        spec_class = getattr(module, "TrainSpec", _FallbackTrainSpec)
        train_spec = spec_class(
            base_model_dir=Path(spec["base_model_dir"]),
            training_files=[(Path(p), float(w)) for p, w in spec["training_files"]],
            validation_files=[Path(p) for p in spec["validation_files"]],
            hyperparameters=dict(spec["hyperparameters"]),
            output_dir=Path(spec["output_dir"]),
            seed=int(spec["seed"]),
        )
        result = train(train_spec, _ProcessReporter(messages, stop))
        messages.put(("result", str(result.adapter_dir), int(result.steps),
                      dict(result.metrics or {}), int(getattr(result, "trained_tokens", 0) or 0)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the worker
        if type(exc).__name__ == "TrainingCancelled" or stop.is_set():
            messages.put(("cancelled",))
        else:
            messages.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        messages.close()
        messages.join_thread()


# -- fine-tuned models in the registry ---------------------------------------------------


def register_fine_tuned(registry: ModelRegistry, record: FineTunedModelRecord) -> bool:
    """Serve a fine-tuned model on its base model's tokenizer and engine; False when the
    base model is not served by this process."""
    try:
        base = registry.get(record.root)
    except UnknownModel:
        return False
    if record.id in registry:
        return True
    try:
        base.engine.add_adapter(record.id, Path(record.adapter_dir))
    except LoRAError as exc:
        log.error("fine-tuned model %s is not served: %s", record.id, exc)
        return False
    registry.add(ServedModel(
        id=record.id,
        kind="generate",
        name=record.name,
        description=record.description or f"LoRA fine-tune of {record.root} "
                                          f"(job {record.job_id})",
        max_context_length=base.max_context_length,
        capabilities=ModelCapabilities(
            completion_chat=True,
            function_calling=base.capabilities.function_calling,
            completion_fim=base.capabilities.completion_fim,
        ),
        created=record.created,
        tokenizer=base.tokenizer,
        engine=base.engine,
        source=record.adapter_dir,
        root=base.id,
        job=record.job_id,
        archived=record.archived,
        adapter=Path(record.adapter_dir),
    ))
    return True


# -- the worker --------------------------------------------------------------------------


class _Heartbeat:
    """Keeps a claimed job's heartbeat fresh while the worker holds it."""

    def __init__(self, jobs: JobQueue, job_id: str) -> None:
        self._jobs, self._job_id = jobs, job_id
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-heartbeat")

    def _run(self) -> None:
        while not self._done.wait(HEARTBEAT_EVERY_S):
            try:
                self._jobs.heartbeat(self._job_id)
            except Exception:  # noqa: BLE001 - a missed beat is not fatal
                log.warning("heartbeat of job %s failed", self._job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=2)


class JobWorker:
    """Claims and runs fine-tuning jobs in a background thread, one at a time."""

    def __init__(self, jobs: JobQueue, files: FileStore, registry: ModelRegistry,
                 data_dir: Path, trainer: str | None = None, poll_interval: float = 0.5,
                 cancel_grace: float = 5.0) -> None:
        self.jobs = jobs
        self.files = files
        self.registry = registry
        self.data_dir = Path(data_dir)
        self.trainer = trainer or os.environ.get(TRAINER_ENV) or DEFAULT_TRAINER
        self.poll_interval = poll_interval
        self.cancel_grace = cancel_grace
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: Any = None  # the training process, while one runs
        self._wandb: WandbRuns | None = None  # the W&B runs of the job training now

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Settle jobs a dead process left behind, serve stored models, start claiming."""
        settled = self.jobs.recover(self._is_dead)
        if settled:
            log.warning("settled %d job(s) interrupted by a previous stop: %s",
                        len(settled), ", ".join(settled))
        for record in self.jobs.models():
            if not register_fine_tuned(self.registry, record):
                log.warning("fine-tuned model %s is not served: its base model %s is not "
                            "loaded by this server", record.id, record.root)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-worker")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        process = self._process
        if process is not None and process.is_alive():  # the trainer ignored the stop
            process.kill()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def _is_dead(self, claimed_by: str | None, heartbeat_at: float | None) -> bool:
        if not claimed_by:
            return True
        host, _, rest = claimed_by.partition(":")
        pid_text, _, token = rest.partition(":")
        if host == socket.gethostname() and pid_text.isdigit():
            pid = int(pid_text)
            if pid == os.getpid():
                return claimed_by != self.worker_id
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return heartbeat_at is None or time.time() - heartbeat_at > STALE_AFTER_S

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping.is_set():
            try:
                job = self.jobs.claim(self.worker_id)
                if job is not None:
                    self._run(job)
                    continue
                if time.monotonic() - last_sweep > 30:
                    last_sweep = time.monotonic()
                    self.jobs.recover(self._is_dead)
                    self.files.delete_expired()
            except Exception:  # noqa: BLE001 - the worker must survive a bad job
                log.exception("job worker error")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    # -- one job ---------------------------------------------------------------------

    def _run(self, job: JobRecord) -> None:
        log.info("job %s claimed (%s)", job.id, job.status)
        with _Heartbeat(self.jobs, job.id):
            try:
                if job.status == VALIDATING and not self._validate(job):
                    return
                if self.jobs.status(job.id) == RUNNING:
                    self._train(job)
            except Exception as exc:  # noqa: BLE001 - becomes the job's failure
                log.exception("job %s failed", job.id)
                self.jobs.add_event(job.id, "job-failed", {"error": f"{type(exc).__name__}: "
                                                                    f"{exc}"})
                self.jobs.transition(job.id, [VALIDATING, RUNNING], FAILED, claimed_by=None)
                self._finish_cancel(job.id)

    def _finish_cancel(self, job_id: str) -> bool:
        return self.jobs.transition(job_id, [CANCELLATION_REQUESTED], CANCELLED, claimed_by=None)

    def _job_dir(self, job_id: str) -> Path:
        return self.data_dir / "fine_tuning" / str(uuid.UUID(job_id))

    def _file_path(self, file_id: str) -> Path | None:
        record = self.files.get(uuid.UUID(file_id))
        if record is None:
            return None
        path = self.files.path(uuid.UUID(record.id))
        return path if path.is_file() else None

    def _tokenizer(self, job: JobRecord) -> Any:
        try:
            return self.registry.get(job.model).tokenizer
        except UnknownModel:
            return None

    def _validate(self, job: JobRecord) -> bool:
        """VALIDATING -> VALIDATED (then RUNNING if auto_start) or FAILED_VALIDATION."""
        tokenizer = self._tokenizer(job)
        reports: list[tuple[str, FileReport]] = []
        missing: list[str] = []
        roles = [("training_files", f["file_id"]) for f in job.training_files] + \
                [("validation_files", fid) for fid in job.validation_files]
        for role, file_id in roles:
            if self._stopping.is_set() or self.jobs.status(job.id) != VALIDATING:
                break
            path = self._file_path(file_id)
            if path is None:
                missing.append(file_id)
                continue
            reports.append((role, validate_file(path, tokenizer, file_id)))
        if self._finish_cancel(job.id):
            return False
        if self._stopping.is_set():
            return False  # the next start validates again
        samples = sum(r.samples for _, r in reports)
        invalid = sum(r.invalid for _, r in reports)
        for role, report in reports:
            if report.invalid:
                self.jobs.add_event(job.id, "validation-errors", {
                    "file_id": report.file_id, "field": role, "samples": report.samples,
                    "invalid_samples": report.invalid, "errors": report.errors,
                })
        skippable = samples and invalid / samples <= job.invalid_sample_skip_percentage
        if missing or (invalid and not skippable):
            why = [f"file {fid} no longer exists" for fid in missing]
            if invalid:
                why.append(f"{invalid} of {samples} samples are invalid (allowed: "
                           f"{job.invalid_sample_skip_percentage:.0%}); see the "
                           "validation-errors events for the line numbers")
            self.jobs.transition(job.id, [VALIDATING], FAILED_VALIDATION,
                                 event_data={"error": "; ".join(why)}, claimed_by=None)
            self._finish_cancel(job.id)
            return False
        if invalid:
            for _, report in reports:
                if report.invalid:
                    source = self._file_path(report.file_id)
                    assert source is not None
                    write_valid_lines(source, self._cleaned_path(job.id, report.file_id),
                                      report.invalid_lines)
        if not self.jobs.transition(job.id, [VALIDATING], VALIDATED,
                                    event_data={"samples": samples, "skipped_samples": invalid},
                                    validated=True):
            self._finish_cancel(job.id)
            return False
        fresh = self.jobs.get(job.id)
        if fresh is not None and fresh.auto_start:
            return self.jobs.transition(job.id, [VALIDATED], RUNNING)
        self.jobs.release(job.id, self.worker_id)  # waits in VALIDATED for /start
        return False

    def _cleaned_path(self, job_id: str, file_id: str) -> Path:
        return self._job_dir(job_id) / "data" / f"{uuid.UUID(file_id)}.jsonl"

    def _data_path(self, job_id: str, file_id: str) -> Path:
        cleaned = self._cleaned_path(job_id, file_id)
        if cleaned.is_file():
            return cleaned
        path = self._file_path(file_id)
        if path is None:
            raise FileNotFoundError(f"file {file_id} no longer exists")
        return path

    def _train(self, job: JobRecord) -> None:
        """RUNNING -> SUCCESS (a fine-tuned model is born), FAILED or CANCELLED."""
        try:
            base = self.registry.get(job.model)
        except UnknownModel:
            raise RuntimeError(f"base model {job.model!r} is not served by this server") \
                from None
        job_dir = self._job_dir(job.id)
        spec = {
            "base_model_dir": str(base.source),
            "training_files": [(str(self._data_path(job.id, f["file_id"])),
                                float(f.get("weight", 1.0))) for f in job.training_files],
            "validation_files": [str(self._data_path(job.id, fid))
                                 for fid in job.validation_files],
            "hyperparameters": dict(job.hyperparameters),
            "output_dir": str(job_dir / "adapter"),
            "seed": uuid.UUID(job.id).int % (2**31),
        }
        self._wandb = self._start_wandb(job, job_dir)
        try:
            self._finish_training(job, base, job_dir, self._run_trainer(job.id, spec))
        finally:
            final = self.jobs.get(job.id)
            self._wandb.finish(final.status, final.fine_tuned_model)
            self._wandb = None

    def _start_wandb(self, job: JobRecord, job_dir: Path) -> WandbRuns:
        config = {"job_id": job.id, "model": job.model, **dict(job.hyperparameters),
                  "training_files": job.training_files,
                  "validation_files": list(job.validation_files)}
        runs = WandbRuns.start(job.id, job.integrations or [], config, job_dir,
                               lambda name, data: self.jobs.add_event(job.id, name, data))
        if runs.urls:
            self.jobs.set_integration_urls(job.id, runs.urls)
        return runs

    def _finish_training(self, job: JobRecord, base: ServedModel, job_dir: Path,
                         outcome: tuple) -> None:
        kind = outcome[0]
        if kind == "result":
            _, adapter_dir, steps, metrics, trained_tokens = outcome
            self._succeed(job, base, Path(adapter_dir), trained_tokens)
            return
        if self.jobs.status(job.id) != CANCELLATION_REQUESTED and kind == "cancelled":
            # The server is stopping: the job waits in the queue and its training resumes
            # from its last checkpoint at the next start.
            self.jobs.transition(job.id, [RUNNING], QUEUED, claimed_by=None, event_data={
                "reason": "the server stopped; training resumes from its last checkpoint "
                          "at the next start"})
            return
        if not self._finish_cancel(job.id):
            self.jobs.add_event(job.id, "job-failed", {"error": outcome[1]})
            self.jobs.transition(job.id, [RUNNING], FAILED, claimed_by=None)
            self._finish_cancel(job.id)
        shutil.rmtree(job_dir / "adapter", ignore_errors=True)
        shutil.rmtree(job_dir / "resume", ignore_errors=True)

    def _run_trainer(self, job_id: str, spec: dict[str, Any]) -> tuple:
        context = multiprocessing.get_context("spawn")
        messages = context.Queue()
        stop = context.Event()
        process = context.Process(
            target=run_training_process, name=f"sirocco-train-{job_id[:8]}",
            args=(self.trainer, spec, messages, stop, os.getpid()))
        process.start()
        self._process = process
        log.info("job %s: training in process %s (%s)", job_id, process.pid, self.trainer)
        outcome: tuple | None = None
        stop_at: float | None = None
        last_check = 0.0
        while True:
            try:
                message = messages.get(timeout=0.25)
            except queue_module.Empty:
                message = None
            if message is not None:
                outcome = self._handle(job_id, message) or outcome
            elif not process.is_alive():
                break  # it exited and everything it sent has been read
            now = time.monotonic()
            if now - last_check >= 0.5:
                last_check = now
                if stop_at is None and (self._stopping.is_set()
                                        or self.jobs.status(job_id) == CANCELLATION_REQUESTED):
                    stop.set()
                    stop_at = now
            if stop_at is not None and now - stop_at > self.cancel_grace:
                log.warning("job %s: trainer did not stop in %.0fs; terminating it",
                            job_id, self.cancel_grace)
                process.terminate()
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                break
        process.join(timeout=5)
        self._process = None
        if outcome is not None:
            return outcome
        if stop_at is not None:
            return ("cancelled",)
        return ("error", f"the training process exited with code {process.exitcode} "
                         "without a result (out of memory?)")

    def _handle(self, job_id: str, message: tuple) -> tuple | None:
        kind = message[0]
        if kind == "event":
            _, name, data = message
            self.jobs.add_event(job_id, name, data)
            if "train_tokens_per_step" in data:
                self._record_plan(job_id, data)
                self._wandb.update_config(data)
            if "step" in data:
                self._wandb.log(data["step"], {k: data.get(k)
                                               for k in ("train_loss", "learning_rate")})
            return None
        if kind == "checkpoint":
            _, step, metrics = message
            self.jobs.add_checkpoint(job_id, step, metrics)
            self._wandb.log(step, metrics)
            return None
        if kind == "error":
            log.error("job %s: training failed:\n%s", job_id, message[2])
        return message

    def _record_plan(self, job_id: str, data: dict[str, Any]) -> None:
        """The trainer's resolved plan, shown as the job's `metadata`."""
        per_step = data.get("train_tokens_per_step")
        steps = data.get("training_steps")
        metadata = {
            "train_tokens_per_step": per_step,
            "data_tokens": data.get("data_tokens"),
            "train_tokens": per_step * steps if per_step and steps else None,
            "cost": 0.0,
        }
        self.jobs.set_metadata(job_id, metadata)

    def _succeed(self, job: JobRecord, base: ServedModel, adapter_dir: Path,
                 trained_tokens: int) -> None:
        model_id = fine_tuned_model_id(base.id, job.suffix, job.created_at, job.id)
        record = FineTunedModelRecord(
            id=model_id, job_id=job.id, root=base.id, adapter_dir=str(adapter_dir),
            name=None, description=None, archived=False, created=int(time.time()))
        if not self.jobs.complete(job.id, record, trained_tokens or None):
            # cancelled at the very end: the cancel wins, the adapter goes
            self._finish_cancel(job.id)
            shutil.rmtree(adapter_dir, ignore_errors=True)
            return
        register_fine_tuned(self.registry, record)
        log.info("job %s succeeded: %s", job.id, model_id)
