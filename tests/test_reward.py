"""Rewards: label by name, weighted terms, length-sorted batching, and the response is never truncated away."""

from __future__ import annotations

import pytest
import torch

from detoxrl.train.config import RewardTermConfig
from detoxrl.train.reward import RewardModel, RewardTerm, fit_to_window, resolve_label

CPU = torch.device("cpu")


def term(path, **kw) -> RewardTerm:
    cfg = RewardTermConfig(model=str(path), **kw)
    return RewardTerm(cfg, str(path), CPU, torch.float32)


# ---- pure window fitting ----------------------------------------------------------------------------------
def test_fit_to_window_drops_prompt_tokens_from_the_left():
    # <s> p1 p2 p3 p4 r1 r2 </s>; the response starts at character 40
    ids = [0, 11, 12, 13, 14, 21, 22, 2]
    offsets = [(0, 0), (0, 10), (10, 20), (20, 30), (30, 40), (40, 45), (45, 50), (0, 0)]
    special = [1, 0, 0, 0, 0, 0, 0, 1]
    kept, cut = fit_to_window(ids, offsets, special, response_start=40, max_length=5)
    assert kept == [0, 14, 21, 22, 2] and not cut


def test_fit_to_window_truncates_the_response_only_when_it_alone_is_too_long():
    ids = [0, 11, 21, 22, 23, 24, 2]
    offsets = [(0, 0), (0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (0, 0)]
    special = [1, 0, 0, 0, 0, 0, 1]
    kept, cut = fit_to_window(ids, offsets, special, response_start=5, max_length=4)
    assert kept == [0, 21, 22, 2] and cut       # all prompt gone, response keeps its beginning


def test_fit_to_window_leaves_short_texts_alone():
    assert fit_to_window([0, 5, 2], [(0, 0), (0, 1), (0, 0)], [1, 0, 1], 0, 10) == ([0, 5, 2], False)


# ---- labels ---------------------------------------------------------------------------------------------
def test_label_is_resolved_by_name():
    assert resolve_label({0: "nothate", 1: "hate"}, "hate", "m") == 1
    assert resolve_label({"0": "NEGATIVE", "1": "POSITIVE"}, "POSITIVE", "m") == 1


def test_unknown_label_lists_the_valid_ones(test_models):
    with pytest.raises(ValueError) as err:
        term(test_models["roberta_hate"], label="toxic")
    assert "'nothate'" in str(err.value) and "'hate'" in str(err.value)


# ---- scoring on real (tiny) classifiers -----------------------------------------------------------------
def test_logit_and_probability_outputs_and_batch_order(test_models):
    t_logit = term(test_models["roberta_hate"], label="hate", output="logit", batch_size=2)
    t_prob = term(test_models["roberta_hate"], label="hate", output="probability", batch_size=3)
    texts = ["a", "the movie was long and the plot was thin", "fine", "you are a stupid idiot honestly"]
    logits = t_logit.logits([""] * 4, texts, with_prompt=False)
    # one-at-a-time scoring equals batched, length-sorted scoring: padding does not change scores
    singles = torch.stack([t_logit.logits([""], [x], with_prompt=False)[0] for x in texts])
    torch.testing.assert_close(logits, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_logit.score([""] * 4, texts), logits[:, 1])
    torch.testing.assert_close(t_prob.score([""] * 4, texts), logits.softmax(-1)[:, 1], atol=1e-6, rtol=1e-5)


def test_response_is_scored_even_when_the_prompt_is_longer_than_the_window(test_models):
    """The seeds' bug: prompt + response truncated to the window, so the response vanished and all scores matched."""
    t = term(test_models["roberta_hate"], label="nothate", score="prompt_response", max_length=32)
    prompt = " ".join(["the weather was nice and we walked to the market"] * 40)  # far beyond 32 tokens
    assert len(t.tokenizer(prompt)["input_ids"]) > 100
    clean, toxic = "thanks for the lovely lunch", "you are a stupid worthless idiot"
    scores = t.score([prompt, prompt], [clean, toxic])
    assert scores[0] != scores[1]
    # the kept tokens end with the whole response (+ the closing special token)
    enc = t.encode([prompt], [toxic], with_prompt=True)[0]
    assert len(enc) == 32
    resp_ids = t.tokenizer(toxic, add_special_tokens=False)["input_ids"]
    assert enc[-1 - len(resp_ids):-1] == resp_ids and enc[-1] == t.tokenizer.eos_token_id


def test_weighted_terms_sum(test_models):
    a = term(test_models["roberta_cola"], label="LABEL_1", weight=1.0)
    b = term(test_models["roberta_sentiment"], label="LABEL_1", weight=0.5)
    texts = ["a quiet film", "bad acting", "wonderful"]
    total, parts = RewardModel([a, b]).score([""] * 3, texts)
    torch.testing.assert_close(total, 1.0 * parts[0] + 0.5 * parts[1])
    torch.testing.assert_close(parts[0], a.score([""] * 3, texts))


def test_demo_classifier_separates_toxic_from_clean_behind_a_long_prompt(demo_assets):
    t = term(demo_assets["reward"], label="hate", output="probability", score="prompt_response")
    prompt = "Summarize the following conversation.\n\n" + "#Person1#: hello. #Person2#: hi there. " * 80
    p = t.score([prompt, prompt], ["#Person1# thanks #Person2# for the lunch.", "you are a stupid worthless idiot"])
    assert p[1] > 0.5 > p[0]
