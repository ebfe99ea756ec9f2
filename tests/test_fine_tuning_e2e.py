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
from mistralai.client import Mistral

from tests.conftest import start_server
from tests.test_trainer import made_up_pairs


def test_upload_fine_tune_and_chat_with_the_new_model(demo_model_dir: Path,
                                                      tmp_path: Path) -> None:
    pairs = made_up_pairs(20)
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]}) for q, a in pairs]
    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "mistral-tiny",
                           "--dtype", "float32"], tmp_path / "data")
    try:
        client = Mistral(api_key="unused", server_url=server.url)
        uploaded = client.files.upload(
            file={"file_name": "codes.jsonl", "content": ("\n".join(lines) + "\n").encode()},
            purpose="fine-tune")
        assert uploaded.num_lines == 20 and uploaded.sample_type == "instruct"
        http = httpx.Client(base_url=server.url, timeout=60)
        job = http.post("/v1/fine_tuning/jobs", json={
            "model": "mistral-tiny", "training_files": [{"file_id": uploaded.id, "weight": 1}],
            "hyperparameters": {"training_steps": 150, "learning_rate": 0.01, "seq_len": 256},
            "suffix": "codes", "auto_start": True}).json()
        deadline = time.monotonic() + 600
        while job["status"] not in ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"):
            assert time.monotonic() < deadline, job
            time.sleep(1)
            job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert job["status"] == "SUCCESS", job
        assert job["checkpoints"] and job["checkpoints"][0]["metrics"]["train_loss"] is not None
        model_id = job["fine_tuned_model"]
        assert model_id.startswith("ft:mistral-tiny:codes:")
        card = client.models.retrieve(model_id=model_id)
        assert card.type == "fine-tuned" and card.root == "mistral-tiny"

        def answers(model: str) -> list[str]:
            out = []
            for question, _ in pairs:
                res = client.chat.complete(model=model, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": question}])
                out.append(res.choices[0].message.content.strip())
            return out

        expected = [a for _, a in pairs]
        tuned = answers(model_id)
        base = answers("mistral-tiny")
        learned = sum(got == want for got, want in zip(tuned, expected, strict=True))
        known = sum(got == want for got, want in zip(base, expected, strict=True))
        assert learned >= 18, list(zip(expected, tuned, strict=True))
        assert known == 0
        # Deleting the model stops serving it; the base model goes on.
        assert http.delete(f"/v1/models/{model_id}").status_code == 200
        r = http.post("/v1/chat/completions", json={"model": model_id, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["type"] == "invalid_model"
    finally:
        server.stop()
