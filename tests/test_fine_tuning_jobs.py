"""`/v1/fine_tuning`: jobs through raw HTTP, every body checked against the 2026-07-15
spec's schemas, with the fast fake trainer (`tests/fake_trainer.py`) in the worker."""

# ruff: noqa: F811 - pytest fixtures imported from conftest_platform are parameters here

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server
from tests.conftest_platform import (  # noqa: F401 - fixtures
    API_KEY,
    api,
    assert_schema,
    chat_jsonl,
    client,
    platform_args,
    platform_env,
    platform_server,
    upload,
    wait_for,
)

# `make test` creates it (see the Makefile); SIROCCO_SDK_251_PYTHON may point elsewhere.
SDK_251_PYTHON = Path(os.environ.get(
    "SIROCCO_SDK_251_PYTHON",
    Path(__file__).resolve().parent.parent / ".venv" / "sdk-2.5.1" / "bin" / "python"))
TERMINAL = {"SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"}


def create(api: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "mistral-tiny")
    body.setdefault("hyperparameters", {"training_steps": 3})
    r = api.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return assert_schema("fine_tuning", "CompletionJobOut", r.json())


def get(api: httpx.Client, job_id: str) -> dict[str, Any]:
    r = api.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return assert_schema("fine_tuning", "CompletionDetailedJobOut", r.json())


def wait_status(api: httpx.Client, job_id: str, *statuses: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (job := get(api, job_id))["status"] in statuses and job, timeout)


def statuses(job: dict[str, Any]) -> list[str]:
    """Status changes in the order they happened (events are listed newest first)."""
    return [e["data"]["status"] for e in reversed(job["events"]) if e["name"] == "status-updated"]


@pytest.fixture()
def training_file(api: httpx.Client) -> str:
    return upload(api, chat_jsonl(20, tag=uuid.uuid4().hex[:6]))["id"]


def test_job_trains_and_its_model_is_served(api: httpx.Client, platform_server: Server,
                                            training_file: str) -> None:
    valid = upload(api, chat_jsonl(2, tag="valid"), "valid.jsonl")["id"]
    job = create(api, training_files=[{"file_id": training_file, "weight": 2}],
                 validation_files=[valid], suffix="zebra", auto_start=True,
                 hyperparameters={"training_steps": 4, "learning_rate": 0.001},
                 integrations=[{"project": "p", "api_key": "k" * 40, "name": "run"}])
    assert job["status"] == "QUEUED" and job["job_type"] == "completion"
    assert job["hyperparameters"] == {"training_steps": 4, "learning_rate": 0.001,
                                      "weight_decay": 0.1, "warmup_fraction": 0.05,
                                      "epochs": None, "seq_len": None, "fim_ratio": 0.9}
    assert job["integrations"] == [{"type": "wandb", "project": "p", "name": "run",
                                    "run_name": None, "url": None}]  # the key is not echoed
    done = wait_status(api, job["id"], *TERMINAL)
    assert done["status"] == "SUCCESS", done["events"]
    assert statuses(done) == ["QUEUED", "VALIDATING", "VALIDATED", "RUNNING", "SUCCESS"]
    assert [c["step_number"] for c in done["checkpoints"]] == [4, 3, 2, 1]  # newest first
    assert done["checkpoints"][0]["metrics"]["valid_loss"] == pytest.approx(2.5 / 4)
    assert done["trained_tokens"] == 400
    assert done["metadata"]["train_tokens_per_step"] == 100
    assert "training started" in [e["name"] for e in done["events"]]
    today = time.strftime("%Y%m%d", time.gmtime(job["created_at"]))
    model_id = done["fine_tuned_model"]
    assert model_id == f"ft:mistral-tiny:zebra:{today}:{job['id'][:8]}"

    cards = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    card = cards[model_id]
    assert (card["type"], card["root"], card["job"]) == ("fine-tuned", "mistral-tiny", job["id"])

    listed = assert_schema("fine_tuning", "JobsOut", api.get("/v1/fine_tuning/jobs").json())
    assert job["id"] in [j["id"] for j in listed["data"]]
    wandb = api.get("/v1/fine_tuning/jobs", params={"wandb_project": "p", "wandb_name": "run"})
    assert [j["id"] for j in wandb.json()["data"]] == [job["id"]]
    check_wandb_run(platform_server.data_dir, job["id"], model_id)

    r = api.patch(f"/v1/fine_tuning/models/{model_id}",
                  json={"name": "Zebra", "description": "knows the secret words"})
    updated = assert_schema("fine_tuning", "CompletionFTModelOut", r.json())
    assert (updated["name"], updated["model_type"], updated["job"]) == ("Zebra", "completion",
                                                                       job["id"])
    card = api.get(f"/v1/models/{model_id}").json()
    assert (card["name"], card["description"]) == ("Zebra", "knows the secret words")
    archived = api.post(f"/v1/fine_tuning/models/{model_id}/archive").json()
    assert assert_schema("fine_tuning", "ArchiveFTModelOut", archived)["archived"] is True
    assert api.get(f"/v1/models/{model_id}").json()["archived"] is True
    unarchived = api.delete(f"/v1/fine_tuning/models/{model_id}/archive").json()
    assert assert_schema("fine_tuning", "UnarchiveFTModelOut", unarchived)["archived"] is False

    assert api.delete(f"/v1/models/{model_id}").json() == {"id": model_id, "object": "model",
                                                          "deleted": True}
    assert model_id not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert api.patch(f"/v1/fine_tuning/models/{model_id}", json={"name": "x"}).status_code == 404


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file: a 7-byte header, then LevelDB-log framing (32 KiB
    blocks; each chunk has a 4-byte checksum, a 2-byte length and a type: 1 whole record,
    2 / 3 / 4 its first / middle / last part) around protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield Record.FromString(pending)
            pending = b""


def check_wandb_run(data_dir: Path, job_id: str, model_id: str) -> None:
    """The job's W&B run (offline, in the job's directory): its project, name and config,
    each checkpoint's metrics at its step, and the outcome in the summary."""
    [run_file] = (data_dir / "fine_tuning" / job_id / "wandb").glob(
        f"offline-run-*-{job_id}/run-{job_id}.wandb")
    history: dict[int, dict[str, float]] = {}
    summary: dict[str, Any] = {}

    def items(updates: Any) -> dict[str, Any]:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}

    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config = items(run.config.update)
            assert (run.project, run.display_name, run.run_id) == ("p", "run", job_id)
            assert config["model"] == "mistral-tiny" and config["training_steps"] == 4
        elif kind == "history":
            row = items(record.history.item)
            history.setdefault(row.pop("_step"), {}).update(row)
        elif kind == "summary":
            summary.update(items(record.summary.update))
    assert sorted(history) == [1, 2, 3, 4]
    assert history[4]["train_loss"] == pytest.approx(2.0 / 4)
    assert history[4]["valid_loss"] == pytest.approx(2.5 / 4)
    assert (summary["status"], summary["fine_tuned_model"]) == ("SUCCESS", model_id)


def test_sdk_manages_the_fine_tuned_model(api: httpx.Client, platform_server: Server,
                                          training_file: str) -> None:
    from mistralai.client import Mistral

    job = create(api, training_files=[{"file_id": training_file}], auto_start=True,
                 hyperparameters={"training_steps": 2})
    model_id = wait_status(api, job["id"], "SUCCESS")["fine_tuned_model"]
    sdk = Mistral(api_key=API_KEY, server_url=platform_server.url)
    updated = sdk.models.update(model_id=model_id, name="Named", description="described")
    assert type(updated).__name__ == "CompletionFineTunedModel"
    assert (updated.id, updated.name, updated.root, updated.job) == (
        model_id, "Named", "mistral-tiny", job["id"])
    assert sdk.models.archive(model_id=model_id).archived is True
    assert sdk.models.retrieve(model_id=model_id).archived is True
    assert sdk.models.unarchive(model_id=model_id).archived is False
    card = sdk.models.retrieve(model_id=model_id)
    assert (type(card).__name__, card.job, card.root, card.name) == (
        "FTModelCard", job["id"], "mistral-tiny", "Named")
    assert sdk.models.delete(model_id=model_id).deleted is True
    assert model_id not in [m.id for m in sdk.models.list().data]


def test_job_without_auto_start_waits_in_validated(api: httpx.Client,
                                                   training_file: str) -> None:
    job = create(api, training_files=[{"file_id": training_file}])  # auto_start: false
    assert job["auto_start"] is False
    validated = wait_status(api, job["id"], "VALIDATED")
    time.sleep(0.5)
    assert get(api, job["id"])["status"] == "VALIDATED"
    r = api.post(f"/v1/fine_tuning/jobs/{job['id']}/start")
    assert r.status_code == 200
    assert_schema("fine_tuning", "CompletionDetailedJobOut", r.json())
    done = wait_status(api, job["id"], *TERMINAL)
    assert done["status"] == "SUCCESS"
    assert statuses(done) == ["QUEUED", "VALIDATING", "VALIDATED", "QUEUED", "RUNNING",
                              "SUCCESS"]
    assert validated["fine_tuned_model"] is None and done["fine_tuned_model"]
    again = api.post(f"/v1/fine_tuning/jobs/{job['id']}/start")
    assert again.status_code == 409 and "SUCCESS" in again.json()["message"]


def test_cancel_stops_a_running_job_within_seconds(api: httpx.Client,
                                                    training_file: str) -> None:
    job = create(api, training_files=[{"file_id": training_file}], auto_start=True,
                 hyperparameters={"training_steps": 5000})  # 250 s of fake training
    wait_for(lambda: get(api, job["id"])["checkpoints"], timeout=30)
    asked = time.monotonic()
    r = api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert assert_schema("fine_tuning", "CompletionDetailedJobOut",
                         r.json())["status"] == "CANCELLATION_REQUESTED"
    done = wait_status(api, job["id"], *TERMINAL, timeout=15)
    assert done["status"] == "CANCELLED" and time.monotonic() - asked < 10
    assert statuses(done)[-2:] == ["CANCELLATION_REQUESTED", "CANCELLED"]
    assert done["fine_tuned_model"] is None
    assert len(done["checkpoints"]) < 5000
    assert api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 409


def test_cancel_of_a_waiting_job_is_immediate(api: httpx.Client, training_file: str) -> None:
    job = create(api, training_files=[{"file_id": training_file}],
                 hyperparameters={"training_steps": 7})
    wait_status(api, job["id"], "VALIDATED")
    cancelled = api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "CANCELLED"


def test_validation_reports_line_numbers(api: httpx.Client) -> None:
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "not json",
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"text": 5},
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b", "weight": 2}]},
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "tool_calls": [{"id": "short", "type": "function",
                       "function": {"name": "f", "arguments": "{}"}}]},
                      {"role": "tool", "tool_call_id": "short", "content": "1"},
                      {"role": "assistant", "content": "done"}]},
        {"prompt": "wrong format"},
    ]
    raw = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
    bad = upload(api, raw, f"bad-{uuid.uuid4().hex[:6]}.jsonl")["id"]
    job = create(api, training_files=[{"file_id": bad}], auto_start=True)
    done = wait_status(api, job["id"], *TERMINAL)
    assert done["status"] == "FAILED_VALIDATION"
    report = next(e["data"] for e in done["events"] if e["name"] == "validation-errors")
    assert report["file_id"] == bad and report["invalid_samples"] == 6
    by_line = {e["line"]: e["message"] for e in report["errors"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "JSON" in by_line[2]
    assert "end with an assistant message" in by_line[3]
    assert "text" in by_line[4]
    assert "weight" in by_line[5]
    assert "9" in by_line[6] or "id" in by_line[6].lower()  # mistral-common: ids are 9 chars
    assert "messages" in by_line[7]
    failed = next(e for e in done["events"] if e["data"].get("status") == "FAILED_VALIDATION")
    assert "6 of 7 samples" in failed["data"]["error"]


def test_invalid_samples_may_be_skipped(api: httpx.Client) -> None:
    good = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"a{i}"}]})
            for i in range(9)]
    raw = ("\n".join(good[:4] + ["{broken"] + good[4:]) + "\n").encode()
    file_id = upload(api, raw, f"skip-{uuid.uuid4().hex[:6]}.jsonl")["id"]
    job = create(api, training_files=[{"file_id": file_id}], auto_start=True,
                 invalid_sample_skip_percentage=0.1)
    done = wait_status(api, job["id"], *TERMINAL)
    assert done["status"] == "SUCCESS", done["events"]
    validated = next(e for e in done["events"] if e["data"].get("status") == "VALIDATED")
    assert validated["data"]["skipped_samples"] == 1


def test_trainer_failure_marks_the_job_failed(api: httpx.Client, training_file: str) -> None:
    job = create(api, training_files=[{"file_id": training_file}], auto_start=True,
                 hyperparameters={"learning_rate": 0.5})
    done = wait_status(api, job["id"], *TERMINAL)
    assert done["status"] == "FAILED"
    failure = next(e for e in done["events"] if e["name"] == "job-failed")
    assert "asked to fail" in failure["data"]["error"]


def test_dry_run_estimates_without_creating(api: httpx.Client, training_file: str) -> None:
    before = api.get("/v1/fine_tuning/jobs").json()["total"]
    r = api.post("/v1/fine_tuning/jobs", params={"dry_run": "true"},
                 json={"model": "mistral-tiny", "training_files": [{"file_id": training_file}],
                       "hyperparameters": {"training_steps": 10, "seq_len": 128}})
    body = assert_schema("fine_tuning", "LegacyJobMetadataOut", r.json())
    assert body["object"] == "job.metadata" and body["training_steps"] == 10
    assert body["train_tokens_per_step"] == 128 and body["train_tokens"] == 1280
    assert body["data_tokens"] > 100 and body["epochs"] > 0 and body["cost"] == 0
    assert api.get("/v1/fine_tuning/jobs").json()["total"] == before


def test_request_errors(api: httpx.Client, training_file: str) -> None:
    def post(**body: Any) -> httpx.Response:
        return api.post("/v1/fine_tuning/jobs", json={
            "model": "mistral-tiny", "hyperparameters": {},
            "training_files": [{"file_id": training_file}], **body})

    unknown = post(model="gpt-4")
    assert unknown.status_code == 400
    assert unknown.json() == {"object": "error", "message": "Invalid model: gpt-4",
                              "type": "invalid_model", "param": "model", "code": "1500"}
    extra = post(temperature=1)
    assert extra.status_code == 422 and extra.json()["detail"][0]["type"] == "extra_forbidden"
    assert post(suffix="x" * 19).json()["detail"][0]["loc"] == ["body", "suffix"]
    assert post(suffix="x" * 18, hyperparameters={"training_steps": 0}).status_code == 422
    assert post(hyperparameters={"learning_rate": 2}).status_code == 422
    assert post(hyperparameters={"training_steps": 3, "epochs": 1}).status_code == 422
    assert post(hyperparameters={"seq_len": 99}).status_code == 422
    assert post(invalid_sample_skip_percentage=0.6).status_code == 422
    assert post(integrations=[{"project": "p", "api_key": "short"}]).status_code == 422
    bad_project = post(integrations=[{"project": "team/p", "api_key": "k" * 40}])
    assert bad_project.json()["detail"][0]["loc"] == ["body", "integrations", 0, "project"]
    ghost = str(uuid.uuid4())
    missing = post(training_files=[{"file_id": training_file}, {"file_id": ghost}])
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "training_files", 1, "file_id"]
    assert ghost in missing.json()["detail"][0]["msg"]
    missing_valid = post(validation_files=[ghost])
    assert missing_valid.json()["detail"][0]["loc"] == ["body", "validation_files", 0]
    overlap = post(validation_files=[training_file])
    assert overlap.status_code == 422 and "overlap" in overlap.json()["detail"][0]["msg"]
    assert post(training_files=[]).json()["detail"][0]["loc"] == ["body", "training_files"]
    assert post(training_files=[{"file_id": "nope"}]).status_code == 422
    assert post(job_type="classifier").status_code == 400
    assert post(model="mistral-embed").json()["type"] == "invalid_model"
    assert api.post("/v1/fine_tuning/jobs", json={"model": "mistral-tiny"}).json()[
        "detail"][0]["loc"] == ["body", "hyperparameters"]

    assert api.get("/v1/fine_tuning/jobs/not-a-uuid").status_code == 422
    for path in ["", "/cancel", "/start"]:
        method = "GET" if not path else "POST"
        r = api.request(method, f"/v1/fine_tuning/jobs/{uuid.uuid4()}{path}")
        assert r.status_code == 404, (path, r.text)
    assert api.patch("/v1/fine_tuning/models/ft:nope:1:2:3", json={}).status_code == 404
    assert api.patch("/v1/fine_tuning/models/mistral-tiny", json={}).status_code == 400
    assert api.patch("/v1/fine_tuning/models/x", json={"colour": 1}).status_code == 422


def test_duplicate_active_job_is_409(api: httpx.Client, training_file: str) -> None:
    body = {"model": "mistral-tiny", "training_files": [{"file_id": training_file}],
            "hyperparameters": {"training_steps": 11}}
    first = api.post("/v1/fine_tuning/jobs", json=body).json()
    second = api.post("/v1/fine_tuning/jobs", json=body)
    assert second.status_code == 409 and first["id"] in second.json()["message"]
    api.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
    wait_status(api, first["id"], "CANCELLED")
    assert api.post("/v1/fine_tuning/jobs", json=body).status_code == 200


def test_list_filters_and_total(api: httpx.Client, training_file: str) -> None:
    suffix = uuid.uuid4().hex[:10]
    ids = [create(api, training_files=[{"file_id": training_file}], suffix=suffix,
                  hyperparameters={"training_steps": i + 1})["id"] for i in range(3)]
    page = api.get("/v1/fine_tuning/jobs", params={"suffix": suffix, "page_size": 2}).json()
    assert_schema("fine_tuning", "JobsOut", page)
    assert page["total"] == 3 and [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = api.get("/v1/fine_tuning/jobs", params={"suffix": suffix, "page_size": 2, "page": 1})
    assert [j["id"] for j in rest.json()["data"]] == ids[:1]
    for job_id in ids:
        wait_status(api, job_id, "VALIDATED")
    api.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel")
    by_status = api.get("/v1/fine_tuning/jobs", params={
        "suffix": suffix, "status": "VALIDATED", "model": "mistral-tiny",
        "created_after": "2020-01-01T00:00:00Z", "created_by_me": "false"}).json()
    assert by_status["total"] == 2
    assert api.get("/v1/fine_tuning/jobs", params={"model": "other"}).json()["total"] == 0
    assert api.get("/v1/fine_tuning/jobs", params={"status": "NOPE"}).status_code == 422
    for job_id in ids[1:]:
        api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


SDK_251_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from mistralai.client import Mistral
    url, key, file_id = sys.argv[1:4]
    client = Mistral(api_key=key, server_url=url)
    out = {}
    job = client.fine_tuning.jobs.create(
        model="mistral-tiny", training_files=[{"file_id": file_id, "weight": 1}],
        hyperparameters={"training_steps": 2}, suffix="sdk251", auto_start=False)
    out["created"] = [type(job).__name__, job.id, job.status, job.job_type]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = client.fine_tuning.jobs.get(job_id=job.id)
        if got.status == "VALIDATED":
            break
        time.sleep(0.1)
    started = client.fine_tuning.jobs.start(job_id=job.id)
    out["started"] = [type(started).__name__, started.status]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = client.fine_tuning.jobs.get(job_id=job.id)
        if got.status in ("SUCCESS", "FAILED"):
            break
        time.sleep(0.1)
    out["done"] = [type(got).__name__, got.status, got.fine_tuned_model,
                   len(got.events), len(got.checkpoints),
                   got.checkpoints[0].metrics.train_loss if got.checkpoints else None]
    listed = client.fine_tuning.jobs.list(suffix="sdk251")
    out["listed"] = [listed.total, [j.id for j in listed.data]]
    other = client.fine_tuning.jobs.create(
        model="mistral-tiny", training_files=[{"file_id": file_id}],
        hyperparameters={"training_steps": 3}, auto_start=False)
    cancelled = client.fine_tuning.jobs.cancel(job_id=other.id)
    deadline = time.monotonic() + 60
    final = cancelled
    while final.status != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.1)
        final = client.fine_tuning.jobs.get(job_id=other.id)
    out["cancelled"] = [type(cancelled).__name__, cancelled.status, final.status]
    model = client.models.retrieve(model_id=got.fine_tuned_model)
    out["model"] = [type(model).__name__, model.id, model.root, model.job]
    print(json.dumps(out))
""")


@pytest.mark.skipif(not SDK_251_PYTHON.exists(),
                    reason=f"no mistralai==2.5.1 venv at {SDK_251_PYTHON} (make install-test "
                           "creates it)")
def test_sdk_2_5_1_fine_tuning_jobs(platform_server: Server, training_file: str) -> None:
    result = subprocess.run([str(SDK_251_PYTHON), "-c", SDK_251_SCRIPT, platform_server.url,
                             API_KEY, training_file], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    kind, job_id, status, job_type = out["created"]
    assert (kind, status, job_type) == ("CompletionFineTuningJob", "QUEUED", "completion")
    assert out["started"][0] == "CompletionFineTuningJobDetails"
    assert out["started"][1] in ("QUEUED", "RUNNING", "SUCCESS")  # the worker may be quick
    kind, status, model_id, n_events, n_checkpoints, loss = out["done"]
    assert (kind, status) == ("CompletionFineTuningJobDetails", "SUCCESS")
    assert re.fullmatch(rf"ft:mistral-tiny:sdk251:\d{{8}}:{job_id[:8]}", model_id)
    assert n_events >= 6 and n_checkpoints == 2 and loss == pytest.approx(1.0)
    assert out["listed"][0] >= 1 and job_id in out["listed"][1]
    kind, status, final = out["cancelled"]
    # A job the worker is validating at that moment is asked to stop first.
    assert kind == "CompletionFineTuningJobDetails"
    assert status in ("CANCELLATION_REQUESTED", "CANCELLED") and final == "CANCELLED"
    assert out["model"] == ["FTModelCard", model_id, "mistral-tiny", job_id]


def test_wandb_integration_needs_wandb_installed(demo_model_dir: Path, tmp_path: Path) -> None:
    """Without the wandb package, a job asking for W&B is refused, not silently run."""
    env = platform_env()
    env["PYTHONPATH"] = f"{Path(__file__).parent / 'no_wandb'}{os.pathsep}{env['PYTHONPATH']}"
    server = start_server(platform_args(demo_model_dir), tmp_path, env=env)
    try:
        with client(server) as api:
            file_id = upload(api, chat_jsonl(3))["id"]
            body = {"model": "mistral-tiny", "hyperparameters": {"training_steps": 1},
                    "training_files": [{"file_id": file_id}]}
            r = api.post("/v1/fine_tuning/jobs", json={
                **body, "integrations": [{"project": "p", "api_key": "k" * 40}]})
            assert r.status_code == 400, r.text
            assert r.json()["param"] == "integrations"
            assert "wandb package is not installed" in r.json()["message"]
            assert api.get("/v1/fine_tuning/jobs").json()["total"] == 0
            assert api.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    finally:
        server.stop()


def test_a_wandb_failure_is_an_event_and_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    import wandb

    from sirocco.finetune.wandb_runs import WandbRuns

    def refuse(**kwargs: Any) -> None:
        raise wandb.errors.CommError("wandb.ai is unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    events: list[tuple[str, dict]] = []
    runs = WandbRuns.start("job-1", [{"project": "p", "api_key": "k" * 40}], {}, tmp_path,
                           lambda name, data: events.append((name, data)))
    assert events == [("wandb-error", {"project": "p",
                                       "error": "CommError: wandb.ai is unreachable"})]
    assert runs.urls == {}
    runs.log(1, {"train_loss": 1.0})  # nothing open: nothing to log, no error
    runs.finish("SUCCESS", "ft:model")
