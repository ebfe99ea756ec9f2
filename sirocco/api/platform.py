"""The platform half of the server: database, file store, job queue and job worker.

Opened when the app starts (migrations run, partial uploads are swept, interrupted jobs
are settled, fine-tuned models are served again) and closed when it stops. Everything
lives in `ServerState.extras` under "database", "files", "jobs" and "worker".
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sirocco.api.state import ServerState
from sirocco.finetune.jobs import JobQueue
from sirocco.finetune.worker import JobWorker
from sirocco.storage.database import open_database
from sirocco.storage.files import FileStore

log = logging.getLogger(__name__)


def open_platform(state: ServerState) -> None:
    settings = state.settings
    database = open_database(settings.database_url, settings.data_dir)
    files = FileStore(database, settings.data_dir)
    files.recover()
    jobs = JobQueue(database)
    worker = JobWorker(jobs, files, state.registry, settings.data_dir)

    def on_model_deleted(model_id: str) -> None:
        """`DELETE /v1/models/{id}` of a fine-tuned model: its row and adapter go too."""
        record = jobs.delete_model(model_id)
        if record is not None:
            adapter = Path(record.adapter_dir)
            if adapter.is_relative_to(settings.data_dir):
                shutil.rmtree(adapter, ignore_errors=True)

    state.extras.update(database=database, files=files, jobs=jobs, worker=worker,
                        on_model_deleted=on_model_deleted)
    worker.start()


def close_platform(state: ServerState) -> None:
    worker = state.extras.pop("worker", None)
    if worker is not None:
        worker.stop()
    database = state.extras.pop("database", None)
    if database is not None:
        database.close()
