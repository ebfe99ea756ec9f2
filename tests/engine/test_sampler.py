"""Each sampling parameter does what it says, per sequence, in one batch."""

from __future__ import annotations

import math

import pytest
import torch

from sirocco.engine.sampler import sample
from sirocco.engine.sampling_params import SamplingParams
from sirocco.engine.sequence import Sequence

VOCAB = 50
EOS = 2


def seq(prompt=(5, 6, 7), output=(), seed=None, **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**params))
    s.token_ids += list(output)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(3)
    tokens, _ = sample(x, [seq(temperature=0) for _ in range(3)])
    assert tokens == x.argmax(-1).tolist()


def test_top_k_one_equals_greedy():
    x = logits(4, seed=1)
    tokens, _ = sample(x, [seq(temperature=1.0, top_k=1) for _ in range(4)])
    assert tokens == x.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best():
    x = logits(1, seed=2)
    best = set(x[0].topk(3).indices.tolist())
    for i in range(50):
        tokens, _ = sample(x, [seq(temperature=5.0, top_k=3, seed=i)])
        assert tokens[0] in best


def test_top_p_keeps_the_nucleus():
    x = torch.full((1, VOCAB), -10.0)
    x[0, 7], x[0, 8], x[0, 9] = 5.0, 4.5, 0.0
    picked = {sample(x, [seq(top_p=0.8, seed=i)])[0][0] for i in range(60)}
    assert picked == {7, 8}


def test_min_p_and_top_a_drop_unlikely_tokens():
    x = torch.full((1, VOCAB), -10.0)
    x[0, 3], x[0, 4] = 5.0, 4.0  # p(4) / p(3) = e^-1 = 0.37
    for kwargs in ({"min_p": 0.5}, {"top_a": 0.9}):  # top_a: 0.9 * 0.73^2 > 0.27
        picked = {sample(x, [seq(seed=i, **kwargs)])[0][0] for i in range(40)}
        assert picked == {3}, kwargs
    picked = {sample(x, [seq(seed=i, min_p=0.2)])[0][0] for i in range(60)}
    assert picked == {3, 4}


def test_logit_bias_forces_a_token():
    tokens, _ = sample(logits(2), [seq(temperature=0, logit_bias={11: 100.0}),
                                   seq(temperature=0.7, logit_bias={12: 100.0}, seed=1)])
    assert tokens == [11, 12]


def test_min_tokens_suppresses_eos_and_stop_ids():
    x = torch.zeros(1, VOCAB)
    x[0, EOS], x[0, 9] = 100.0, 90.0
    tokens, _ = sample(x, [seq(temperature=0, min_tokens=2, output=[4])], eos_token_ids=(EOS,))
    assert tokens == [9]
    tokens, _ = sample(x, [seq(temperature=0, min_tokens=2, output=[4], stop_token_ids=[9])],
                       eos_token_ids=(EOS,))
    assert tokens not in ([EOS], [9])
    tokens, _ = sample(x, [seq(temperature=0, min_tokens=1, output=[4])], eos_token_ids=(EOS,))
    assert tokens == [EOS]


def test_presence_and_frequency_penalties_lower_repeated_tokens():
    x = torch.zeros(1, VOCAB)
    x[0, 20], x[0, 21] = 2.0, 1.5
    assert sample(x, [seq(temperature=0, output=[20])])[0] == [20]
    assert sample(x, [seq(temperature=0, output=[20], presence_penalty=1.0)])[0] == [21]
    assert sample(x, [seq(temperature=0, output=[20, 20, 20, 21], frequency_penalty=0.4)])[0] \
        == [21]  # 2.0 - 3 * 0.4 < 1.5 - 0.4


def test_repetition_penalty_covers_prompt_tokens():
    x = torch.zeros(1, VOCAB)
    x[0, 5], x[0, 30] = 3.0, 2.0  # 5 is in the prompt
    assert sample(x, [seq(temperature=0)])[0] == [5]
    assert sample(x, [seq(temperature=0, repetition_penalty=2.0)])[0] == [30]


def test_seeded_sequence_ignores_its_batch_mates():
    x = logits(1, seed=3)
    alone = [sample(x, [s])[0][0] for s in [seq(seed=7, temperature=1.0)] for _ in range(1)]
    mates = torch.cat([logits(2, seed=4), x, logits(1, seed=5)])
    s_alone, s_batched = seq(seed=7), seq(seed=7)
    run_alone, run_batched = [], []
    for _ in range(10):
        run_alone.append(sample(x, [s_alone])[0][0])
        others = [seq(temperature=0.9), seq(seed=1), seq(top_p=0.5)]
        tokens, _ = sample(mates, [others[0], others[1], s_batched, others[2]])
        run_batched.append(tokens[2])
    assert run_alone == run_batched
    assert alone[0] == run_alone[0]
    assert len(set(run_alone)) > 1  # it does sample


def test_logprobs_are_of_the_raw_distribution():
    x = logits(3, seed=6)
    seqs = [seq(temperature=0, logprobs=3), seq(temperature=0), seq(temperature=0.5, seed=1,
                                                                    logprobs=0, top_k=2)]
    tokens, lps = sample(x, seqs)
    raw = torch.log_softmax(x, -1)
    assert lps[1] is None
    assert lps[0].token_id == tokens[0] and len(lps[0].top) == 3
    assert lps[0].logprob == pytest.approx(raw[0, tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in lps[0].top] == raw[0].topk(3).indices.tolist()
    assert lps[2].top == [] and lps[2].logprob == pytest.approx(raw[2, tokens[2]].item(),
                                                                abs=1e-5)
    assert math.isfinite(lps[2].logprob)


def test_logits_processor_masks_tokens():
    def only_even(output, row):
        row[1::2] = float("-inf")
        return row

    for i in range(20):
        tokens, _ = sample(logits(1, seed=i), [seq(seed=i, logits_processors=[only_even])])
        assert tokens[0] % 2 == 0


def test_invalid_params_are_rejected():
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"n": 0}, {"min_tokens": 5, "max_tokens": 2},
                   {"logprobs": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
