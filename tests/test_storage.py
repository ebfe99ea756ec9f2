"""Storage and the job queue: migrations, atomic blobs, exclusive claims, validation with
mistral-common, and durability across a server crash and restart."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sirocco.finetune.data import validate_file
from sirocco.finetune.jobs import (
    MAX_INTERRUPTIONS,
    QUEUED,
    RUNNING,
    VALIDATED,
    VALIDATING,
    JobQueue,
    fine_tuned_model_id,
)
from sirocco.storage.blobs import BlobStore, BlobTooLarge
from sirocco.storage.database import open_database
from sirocco.storage.files import FileStore
from tests.conftest import free_port
from tests.conftest_platform import (
    SCHEMAS_PATH,
    chat_jsonl,
    client,
    start_platform_server,
    upload,
    wait_for,
)

SPECS = Path(__file__).resolve().parents[2] / "shared" / "reference"


def test_migrations_create_the_schema_in_wal_mode(tmp_path: Path) -> None:
    database = open_database(None, tmp_path / "data")
    open_database(None, tmp_path / "data").close()  # upgrading twice is a no-op
    database.close()
    with sqlite3.connect(tmp_path / "data" / "sirocco.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert {"files", "fine_tuning_jobs", "fine_tuning_job_events", "fine_tuning_checkpoints",
            "fine_tuned_models", "alembic_version"} <= tables
    assert version == "0001"


def test_blob_is_invisible_until_committed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "files")
    blob_id = uuid.uuid4()
    writer = store.writer(max_size=10)
    writer.write(b"hello")
    assert not store.exists(blob_id)
    assert [p.name.startswith(".tmp-") for p in store.root.iterdir()] == [True]
    writer.commit(blob_id)
    assert store.path(blob_id).read_bytes() == b"hello"
    assert [p.name for p in store.root.iterdir()] == [str(blob_id)]

    too_big = store.writer(max_size=10)
    too_big.write(b"x" * 10)
    with pytest.raises(BlobTooLarge):
        too_big.write(b"y")
    too_big.abort()
    assert [p.name for p in store.root.iterdir()] == [str(blob_id)]

    (store.root / ".tmp-crashed").write_bytes(b"half")
    assert store.remove_partial_writes() == 1
    with pytest.raises(TypeError):
        store.path("../secret.key")  # type: ignore[arg-type]


def _add(files: FileStore, content: bytes, expiry_hours: int | None = None) -> uuid.UUID:
    writer = files.blobs.writer()
    writer.write(content)
    return uuid.UUID(files.add(writer, "same.jsonl", "fine-tune", "workspace", None,
                               expiry_hours).id)


def test_files_with_the_same_bytes_share_one_blob_and_expire_alone(tmp_path: Path) -> None:
    database = open_database(None, tmp_path)
    files = FileStore(database, tmp_path)
    content = b'{"text": "shared"}\n'
    expiring, kept = _add(files, content, expiry_hours=1), _add(files, content)
    assert files.path(expiring).stat().st_ino == files.path(kept).stat().st_ino
    with sqlite3.connect(tmp_path / "sirocco.db") as conn:
        conn.execute("UPDATE files SET expires_at = 1 WHERE id = ?", (str(expiring),))
    assert files.delete_expired() == 1
    files.recover()
    assert files.get(expiring) is None and not files.path(expiring).exists()
    assert files.get(kept) is not None and files.path(kept).read_bytes() == content
    assert [p.name for p in files.blobs.root.iterdir()] == [str(kept)]
    database.close()


def test_bytes_are_written_when_they_cannot_be_shared(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    database = open_database(None, tmp_path)
    files = FileStore(database, tmp_path)
    content = b'{"text": "copied"}\n'
    first = _add(files, content)
    files.blobs.delete(first)  # a twin whose blob went away meanwhile
    second = _add(files, content)
    assert files.path(second).read_bytes() == content

    def no_hard_links(*args: object, **kwargs: object) -> None:
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_hard_links)
    third = _add(files, content)
    assert files.path(third).read_bytes() == content
    assert files.path(third).stat().st_ino != files.path(second).stat().st_ino
    assert not any(p.name.startswith(".tmp-") for p in files.blobs.root.iterdir())
    database.close()


def _queue(tmp_path: Path) -> JobQueue:
    return JobQueue(open_database(None, tmp_path))


def _job(jobs: JobQueue, fingerprint: str = "x") -> str:
    return jobs.create(model="m", training_files=[], validation_files=[], hyperparameters={},
                       suffix=None, integrations=None, auto_start=True,
                       invalid_sample_skip_percentage=0, fingerprint=fingerprint).id


def _claim_concurrently(jobs: JobQueue, workers: int) -> list[object]:
    """What `workers` threads get when they all call `claim` at the same moment."""
    claims: list[object] = []
    start = threading.Barrier(workers)

    def claim(i: int) -> None:
        start.wait()
        claims.append(jobs.claim(f"worker-{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return claims


def test_only_one_worker_claims_a_job(tmp_path: Path) -> None:
    jobs = _queue(tmp_path)
    job_id = _job(jobs)
    claims = _claim_concurrently(jobs, workers=6)
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].id == job_id and won[0].status == VALIDATING
    assert jobs.claim("late") is None
    assert not jobs.transition(job_id, [QUEUED], RUNNING)  # wrong source status: no change
    assert jobs.transition(job_id, [VALIDATING], VALIDATED)
    assert jobs.status(job_id) == VALIDATED


def test_recovery_requeues_a_job_whose_worker_died(tmp_path: Path) -> None:
    jobs = _queue(tmp_path)
    running, validating = _job(jobs, "a"), _job(jobs, "b")
    jobs.claim("host:1:dead")
    jobs.claim("host:1:dead")
    jobs.transition(running, [VALIDATING], RUNNING)
    assert sorted(jobs.recover(lambda claimed_by, beat: True)) == sorted([running, validating])
    assert jobs.status(running) == QUEUED and jobs.status(validating) == QUEUED
    job, events, _ = jobs.details(running)
    interrupted = [e for e in events if e.name == "training-interrupted"]
    assert len(interrupted) == 1 and "stopped" in interrupted[0].data["error"]
    # Already validated: its next claim goes straight back to training (to resume).
    assert jobs.claim("host:2:alive").id == running and jobs.status(running) == RUNNING
    for _ in range(MAX_INTERRUPTIONS):  # ... until it has been interrupted too often
        jobs.recover(lambda claimed_by, beat: True)
        jobs.claim("host:2:alive")
    assert jobs.status(running) == "FAILED"
    job, events, _ = jobs.details(running)
    assert any(e.name == "job-failed" and "4 times" in e.data["error"] for e in events)


def test_fine_tuned_model_ids() -> None:
    job_id = "2813b7e6-c511-43ac-8e42-9f2ea6d2a8b1"
    created = 1717113600  # 2024-05-31
    assert fine_tuned_model_id("open-mistral-7b", None, created, job_id).startswith(
        "ft:open-mistral-7b:")
    plain = fine_tuned_model_id("open-mistral-7b", None, created, job_id).split(":")
    assert len(plain[2]) == 8 and int(plain[2], 16) >= 0
    assert plain[3:] == ["20240531", "2813b7e6"]
    assert fine_tuned_model_id("m", "my-great-model", created, job_id) == \
        "ft:m:my-great-model:20240531:2813b7e6"


def test_mistral_common_validator_checks_tool_calls(tmp_path: Path,
                                                   demo_model_dir: Path) -> None:
    from sirocco.tokenizers.mistral import MistralCommonTokenizer, find_mistral_tokenizer

    tokenizer = MistralCommonTokenizer(find_mistral_tokenizer(demo_model_dir))
    call = {"role": "assistant", "tool_calls": [{"id": "abc", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}]}
    samples = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, call,
                      {"role": "tool", "tool_call_id": "abc", "content": "1"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "weight": 0},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    report = validate_file(path, tokenizer, "f")
    assert (report.samples, report.invalid, report.invalid_lines) == (3, 1, [2])
    assert "id" in report.errors[0]["message"].lower()
    # Mistral's fine-tuning rules apply whatever the model: training applies them too
    assert validate_file(path, None, "f").invalid_lines == [2]


@pytest.mark.skipif(not (SPECS / "mistral-openapi.yaml").exists(), reason="specs not at hand")
def test_vendored_schemas_match_the_specs() -> None:
    yaml = pytest.importorskip("yaml")
    vendored = json.loads(SCHEMAS_PATH.read_text())
    sources = {"fine_tuning": "mistral-openapi-2026-07-15-with-fine-tuning-jobs.yaml",
               "files": "mistral-openapi.yaml"}
    for group, filename in sources.items():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        spec = yaml.load((SPECS / filename).read_text(), Loader=loader)["components"]["schemas"]
        for name, schema in vendored[group]["components"]["schemas"].items():
            text = json.dumps(schema, sort_keys=True).replace('"minimum": 1e-08',
                                                              '"minimum": "1e-08"')
            assert text == json.dumps(spec[name], sort_keys=True), name


def test_everything_survives_a_crash_and_restart(demo_model_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_platform_server(demo_model_dir, data_dir)
    try:
        with client(server) as api:
            content = chat_jsonl(12, "durable")
            file_id = upload(api, content, "durable.jsonl")["id"]
            body = {"model": "mistral-tiny", "training_files": [{"file_id": file_id}]}
            done_id = api.post("/v1/fine_tuning/jobs", json={
                **body, "auto_start": True, "hyperparameters": {"training_steps": 2}}).json()["id"]
            model_id = wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{done_id}").json()[
                "fine_tuned_model"])
            waiting_id = api.post("/v1/fine_tuning/jobs", json={
                **body, "hyperparameters": {"training_steps": 3}}).json()["id"]
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{waiting_id}").json()["status"]
                     == "VALIDATED")
            running_id = api.post("/v1/fine_tuning/jobs", json={
                **body, "auto_start": True,
                "hyperparameters": {"training_steps": 5000}}).json()["id"]
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{running_id}").json()["checkpoints"])
    finally:
        server.process.kill()  # a crash: no shutdown code runs
        server.process.wait()
    (data_dir / "files" / ".tmp-interrupted-upload").write_bytes(b"half an upload")
    orphan = data_dir / "files" / str(uuid.uuid4())
    orphan.write_bytes(b"a blob whose row was never written")

    server = start_platform_server(demo_model_dir, data_dir)
    try:
        with client(server) as api:
            assert api.get(f"/v1/files/{file_id}").json()["bytes"] == len(content)
            assert api.get(f"/v1/files/{file_id}/content").content == content
            assert sorted(p.name for p in (data_dir / "files").iterdir()) == [file_id]

            done = api.get(f"/v1/fine_tuning/jobs/{done_id}").json()
            assert done["status"] == "SUCCESS" and len(done["checkpoints"]) == 2
            cards = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
            assert cards[model_id]["type"] == "fine-tuned"
            assert cards[model_id]["job"] == done_id

            # The job that was training is back in the queue, to resume (the fake trainer
            # starts over; test_fine_tuning_e2e resumes a real one); cancel it.
            crashed = api.get(f"/v1/fine_tuning/jobs/{running_id}").json()
            assert crashed["status"] in ("QUEUED", "RUNNING")
            interrupted = next(e for e in crashed["events"]
                               if e["name"] == "training-interrupted")
            assert "stopped while this job was training" in interrupted["data"]["error"]
            api.post(f"/v1/fine_tuning/jobs/{running_id}/cancel")
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{running_id}").json()["status"]
                     == "CANCELLED")

            assert api.get(f"/v1/fine_tuning/jobs/{waiting_id}").json()["status"] == "VALIDATED"
            api.post(f"/v1/fine_tuning/jobs/{waiting_id}/start")
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{waiting_id}").json()["status"]
                     == "SUCCESS")
            assert api.get("/v1/fine_tuning/jobs").json()["total"] == 3
            assert api.delete(f"/v1/models/{model_id}").status_code == 200
    finally:
        server.stop()
    time.sleep(0.1)
    with sqlite3.connect(data_dir / "sirocco.db") as conn:
        models = [r[0] for r in conn.execute("SELECT id FROM fine_tuned_models")]
    assert model_id not in models and len(models) == 1


def test_a_job_training_at_shutdown_waits_in_the_queue(demo_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """Ctrl-C while a job trains: the server exits cleanly, the job is QUEUED (not
    FAILED), and the next start trains it again (from its last checkpoint)."""
    data_dir = tmp_path / "data"
    server = start_platform_server(demo_model_dir, data_dir)
    try:
        with client(server) as api:
            file_id = upload(api, chat_jsonl(4, "stop"), "stop.jsonl")["id"]
            job_id = api.post("/v1/fine_tuning/jobs", json={
                "model": "mistral-tiny", "training_files": [{"file_id": file_id}],
                "auto_start": True, "hyperparameters": {"training_steps": 5000}}).json()["id"]
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["checkpoints"])
    finally:
        assert server.stop() == 0
    server = start_platform_server(demo_model_dir, data_dir)
    try:
        with client(server) as api:
            job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            assert "training-interrupted" not in [e["name"] for e in job["events"]]
            queued = [e["data"] for e in job["events"] if e["name"] == "status-updated"
                      and e["data"]["status"] == "QUEUED" and "reason" in e["data"]]
            assert "the server stopped" in queued[0]["reason"]
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
                     == "RUNNING")
            api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            wait_for(lambda: api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
                     == "CANCELLED")
    finally:
        server.stop()


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (skipped where PostgreSQL or psycopg is missing)."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed")
    home = Path(tempfile.mkdtemp(prefix="sirocco-pg-"))  # pytest's tmp dirs are root-only
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(home, "nobody")
        run_as = ["runuser", "-u", "nobody", "--"]
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(home / "data"), "-A", "trust", "-U", "sirocco"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(home / "data"), "-l", str(home / "log"), "-w",
                    "-o", f"-k {home} -p {port} -c listen_addresses=''", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://sirocco@/postgres?host={home}&port={port}"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(home / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_postgresql_claims_with_skip_locked(postgres_url: str, tmp_path: Path) -> None:
    database = open_database(postgres_url, tmp_path)
    open_database(postgres_url, tmp_path).close()  # migrations are idempotent there too
    jobs = JobQueue(database)
    ids = {_job(jobs, f"job-{i}") for i in range(3)}
    claims = _claim_concurrently(jobs, workers=6)
    won = [c.id for c in claims if c is not None]
    assert sorted(won) == sorted(ids)  # every job claimed exactly once
    files = FileStore(database, tmp_path)
    writer = files.blobs.writer()
    writer.write(b'{"text": "a"}\n')
    record = files.add(writer, "pg.jsonl", "fine-tune", "workspace", None, None)
    assert files.list(search="PG.J")[1] == 1 and files.get(uuid.UUID(record.id)) is not None
    database.close()
