"""Weights & Biases runs for fine-tuning jobs created with a `wandb` integration.

Each integration of a job gets one W&B run while the job trains:

- config: the job's model, hyperparameters and files, then the trainer's plan (steps,
  batch, tokens per step, ...);
- history, at the training step: the trainer's progress (train_loss, learning_rate) and
  each checkpoint's metrics (train_loss, valid_loss, valid_mean_token_accuracy);
- summary: the job's final status and its fine-tuned model.

The run id is the job id, its display name the integration's `name` (or `run_name`, else
the job id), and it logs in with the integration's API key. wandb's own environment
variables apply: `WANDB_MODE=offline` keeps the runs on disk for a later `wandb sync`,
`WANDB_BASE_URL` points at a self-hosted W&B server. Run files live in the job's
directory.

W&B is for watching a job, so it never fails one: an error from W&B becomes a
`wandb-error` event on the job and training goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sirocco[wandb]'"


@functools.cache
def wandb_available() -> bool:
    """Whether wandb imports (the first call imports it: about a second)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


class WandbRuns:
    """The open runs of one job. Every method is safe to call whatever happened before."""

    def __init__(self, add_event: Callable[[str, dict], None]) -> None:
        self._add_event = add_event
        self._runs: list[tuple[int, str, Any]] = []  # (integration index, project, Run)

    @classmethod
    def start(cls, job_id: str, integrations: list[dict[str, Any]], config: dict[str, Any],
              directory: Path, add_event: Callable[[str, dict], None]) -> WandbRuns:
        runs = cls(add_event)
        if not integrations:
            return runs
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        for i, integration in enumerate(integrations):
            project = integration["project"]
            try:
                run = wandb.init(
                    project=project, id=job_id if i == 0 else f"{job_id}-{i}",
                    name=integration.get("name") or integration.get("run_name") or job_id,
                    config=config, dir=str(directory), reinit="create_new",
                    settings=wandb.Settings(api_key=integration["api_key"], init_timeout=30,
                                            silent=True, console="off"))
            except Exception as exc:  # noqa: BLE001 - reported on the job, training goes on
                runs._error(project, exc)
                continue
            runs._runs.append((i, project, run))
        return runs

    @property
    def urls(self) -> dict[int, str]:
        """The page of each integration's run, by integration index (offline runs and
        runs that failed to start have none)."""
        return {i: run.url for i, _, run in self._runs if run.url}

    def update_config(self, data: dict[str, Any]) -> None:
        self._each(lambda run: run.config.update(data, allow_val_change=True))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if values:
            self._each(lambda run: run.log(values, step=step))

    def finish(self, status: str, fine_tuned_model: str | None) -> None:
        def close(run: Any) -> None:
            run.summary.update({"status": status, "fine_tuned_model": fine_tuned_model})
            run.finish(exit_code=0 if status == "SUCCESS" else 1)

        self._each(close)
        self._runs = []

    def _each(self, action: Callable[[Any], None]) -> None:
        for entry in list(self._runs):
            _, project, run = entry
            try:
                action(run)
            except Exception as exc:  # noqa: BLE001
                self._error(project, exc)
                self._runs.remove(entry)

    def _error(self, project: str, exc: Exception) -> None:
        log.warning("W&B project %r: %s: %s", project, type(exc).__name__, exc)
        self._add_event("wandb-error", {"project": project,
                                        "error": f"{type(exc).__name__}: {exc}"})
