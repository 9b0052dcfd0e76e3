"""Scorers' pure parts: which scorer holds which model, the token-budget packing and its scores, the wire format.
The processes themselves (2 training ranks + a reward scorer + a reference scorer, bitwise equal to local scoring,
a killed scorer, resume) run inside tests/test_distributed.py's launches."""

from __future__ import annotations

import torch

from detoxrl.train.config import RewardTermConfig
from detoxrl.train.reward import RewardTerm, token_budget_batches
from detoxrl.train.scorers import ScorerSpec, decode_texts, encode_texts, plan_scorers


def test_one_scorer_per_device_and_one_per_model_on_the_cpu():
    # two terms and the reference on one spare GPU share a scorer; a term on another GPU gets its own
    assert plan_scorers(["cuda:6", "cuda:7", "cuda:6"], "cuda:6") == [ScorerSpec(0, "cuda:6", [0, 2], True),
                                                                      ScorerSpec(1, "cuda:7", [1], False)]
    # the CPU: a scorer per model, so that they run in parallel
    assert plan_scorers(["cpu"], "cpu") == [ScorerSpec(0, "cpu", [0]), ScorerSpec(1, "cpu", [], True)]
    # None: that model stays local (reward local, reference on a scorer)
    assert plan_scorers([None, None], "cuda:1") == [ScorerSpec(0, "cuda:1", [], True)]
    assert ScorerSpec(0, "cuda:6", [0, 2], True).describe() == \
        "scorer 0 (reward term 0, reward term 2, reference on cuda:6)"


def test_token_budget_batches_fill_up_to_the_budget():
    assert token_budget_batches([2, 3, 3, 5, 9], 10) == [(0, 3), (3, 4), (4, 5)]  # 3x3=9, 1x5 (2x9 > 10), 9
    assert token_budget_batches([20], 10) == [(0, 1)]                              # a text over budget: alone
    assert token_budget_batches([], 10) == []
    spans = token_budget_batches(list(range(1, 50)), 64)
    assert spans[0][0] == 0 and spans[-1][1] == 49 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all((e - s) * n <= 64 or e - s == 1 for (s, e), n in zip(spans, [e for _, e in spans]))


def test_packed_scores_agree_with_per_batch_scores(demo_assets):
    """Packing every rank's texts into shared length-sorted batches changes only the rounding (batch-size-dependent
    kernels), never which text gets which score."""
    term = RewardTerm(RewardTermConfig(model="demo", batch_size=4), str(demo_assets["reward"]), torch.device("cpu"),
                      torch.float32)
    texts = ["you are an idiot", "thanks a lot", "the meeting moved to noon, bring the report and the slides", "no",
             "Person1 wants a car but has no money"] * 5
    local = term.logits([""] * len(texts), texts, False)
    packed = term.logits([""] * len(texts), texts, False, max_batch_tokens=64)
    torch.testing.assert_close(packed, local, atol=1e-5, rtol=1e-5)
    assert not torch.equal(local[0], local[1])


def test_text_payloads_round_trip():
    payload = {"prompts": ["a\u00e9", ""], "responses": ["\U0001f600 b", "c"]}
    t = encode_texts(payload)
    assert t.dtype == torch.uint8 and decode_texts(t) == payload


def test_request_chunks_keep_requests_whole_within_the_budget():
    from detoxrl.train.scorer_server import request_chunks

    assert request_chunks([(4, 10), (4, 12), (4, 30)], 100) == [[0, 1], [2]]  # 8 x 12 = 96; 12 x 30 > 100
    assert request_chunks([(8, 50)], 10) == [[0]]                             # a request over budget: alone


def test_packed_reference_logprobs_agree_with_per_request(demo_assets):
    """Re-padding the ranks' requests to one shape (seq2seq: prompts on the right; causal: prompts on the left, the
    positions follow the mask) changes nothing but roundings, in every row's real positions."""
    from transformers import AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel

    from detoxrl.train.models import FrozenReference
    from detoxrl.train.scorer_server import reference_round
    from detoxrl.train.scorers import header

    torch.manual_seed(0)
    seq2seq = FrozenReference(AutoModelForSeq2SeqLM.from_pretrained(str(demo_assets["policy"])), "seq2seq")
    causal = FrozenReference(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                        n_positions=64)), "causal")
    for reference, left in ((seq2seq, False), (causal, True)):
        requests = []
        for b, p, t in ((4, 5, 3), (4, 9, 6)):  # two ranks, different prompt and response lengths, groups of k=2
            ids = torch.randint(3, 90, (b, p))
            mask = torch.ones(b, p, dtype=torch.long)
            mask[0::2, :2] = 0 if left else 1  # some padding inside each request (left for causal)
            if not left:
                mask[0::2, -2:] = 0
            ids[1::2] = ids[0::2]  # k=2 responses per prompt share it
            mask[1::2] = mask[0::2]
            payload = torch.cat([ids.reshape(-1), mask.reshape(-1), torch.randint(3, 90, (b, t)).reshape(-1)])
            requests.append((header(2, 0, payload, b, p, t), payload))
        alone = reference_round(reference, requests, 1.0, 2, "per_rank", 10_000)
        packed = reference_round(reference, requests, 1.0, 2, "packed", 10_000)
        assert [a.shape for a in alone] == [(4, 3), (4, 6)] == [q.shape for q in packed]
        for a, q in zip(alone, packed):
            torch.testing.assert_close(q, a, atol=1e-5, rtol=1e-5)


SILENT_SCORER = """
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
from detoxrl.train.scorers import loopback_group
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
group = loopback_group(store, 1, 2, timedelta(seconds=120))
group.recv([torch.zeros(8, dtype=torch.int64)], 0, 11).wait()  # takes the header, answers nothing
time.sleep(120)
"""


def test_a_silent_scorer_is_named_after_the_timeout(tmp_path):
    """A scorer that takes a request and never answers: the wait ends after scorer.timeout with one line naming it
    (a killed scorer runs in tests/test_distributed.py)."""
    import subprocess
    import sys
    import time
    from datetime import timedelta

    import pytest
    import torch.distributed as dist

    from detoxrl.train.config import ScorerConfig
    from detoxrl.train.scorers import ScorerError, ScorerPool, loopback_group

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    silent = subprocess.Popen([sys.executable, "-c", SILENT_SCORER, str(store.port)])
    try:
        group = loopback_group(store, 0, 2, timedelta(seconds=120))  # the pool waits scorer.timeout itself
        pool = ScorerPool(group, 0, 1, [ScorerSpec(0, "cpu", [0])], ScorerConfig(timeout=1.0), [{}],
                          [tmp_path / "scorer-0.log"], [], store)
        named = (r"^scorer 0 \(reward term 0 on cpu\) of machine rank 0 did not answer within scorer.timeout=1 s "
                 r"\(hung or overloaded\); its log: .*scorer-0.log$")
        t0 = time.perf_counter()
        with pytest.raises(ScorerError, match=named):
            pool.request(0, 1, 0, encode_texts({"responses": ["x"]}), [0], (1, 2)).result()
        assert time.perf_counter() - t0 < 10
        later = pool.request(0, 1, 0, encode_texts({"responses": ["x"]}), [0], (1, 2))  # never raises itself: the
        t0 = time.perf_counter()                                                          # loop meets it on waiting
        with pytest.raises(ScorerError, match="did not answer"):  # ... at once, with the same line
            later.result()
        assert time.perf_counter() - t0 < 1
    finally:
        silent.kill()
        silent.wait()


def test_a_packed_reward_round_returns_each_rank_its_own_rows(demo_assets):
    """Two ranks' texts scored in shared batches come back split per rank, in each rank's order (per_rank: each
    rank's texts exactly as a local term scores them)."""
    from detoxrl.train.scorer_server import reward_round
    from detoxrl.train.scorers import header

    term = RewardTerm(RewardTermConfig(model="demo", batch_size=3), str(demo_assets["reward"]), torch.device("cpu"),
                      torch.float32)
    ranks = [["you are an idiot", "thanks", "the report is due at noon"], ["no", "Person1 has no money at all"]]
    requests = [(header(1, 0, p, 0), p) for p in (encode_texts({"prompts": [], "responses": r}) for r in ranks)]
    per_rank = reward_round(term, requests, "per_rank", 0)
    packed = reward_round(term, requests, "packed", 32)
    for texts, a, q in zip(ranks, per_rank, packed):
        assert torch.equal(a, term.logits([""] * len(texts), texts, False))
        torch.testing.assert_close(q, a, atol=1e-5, rtol=1e-5)
