"""Judges: the demo's judge is independent of the reward model (other data, architecture, tokenizer, labels) and
still grades toxicity well; multi-label judges use a sigmoid; detoxrl-eval reports judges with intervals and flags
a policy whose reward improved while a judge's toxicity did not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from detoxrl.eval import metrics as M
from detoxrl.train.config import JudgeConfig, RewardTermConfig
from detoxrl.train.judges import Judge
from detoxrl.train.reward import RewardTerm
from detoxrl.train.demo_assets import build_demo_judge
from detoxrl.train.shipped_data import DEMO_DATA_DIR, is_toxic_text, load_jsonl

CPU = torch.device("cpu")


def test_judge_sentences_are_disjoint_from_everything_the_reward_model_learned():
    judge = load_jsonl(DEMO_DATA_DIR / "judge_toxicity.jsonl")
    reward_texts = {r["text"] for r in load_jsonl(DEMO_DATA_DIR / "toxicity.jsonl")}
    reward_texts |= {r["summary"] for r in load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")}
    texts = [r["text"] for r in judge]
    assert len(set(texts)) == len(texts) >= 300 and not set(texts) & reward_texts
    assert {r["label"] for r in judge} == {"toxic", "neutral"}
    assert 0.3 < np.mean([r["label"] == "toxic" for r in judge]) < 0.6


def test_demo_judge_is_another_model_and_grades_the_reward_models_sentences(demo_assets, demo_cache):
    path = build_demo_judge()
    assert path.parent == demo_cache and path.name.startswith("judge-")        # its own cache entry
    cfg, reward_cfg = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(demo_assets["reward"])
    assert (cfg.model_type, reward_cfg.model_type) == ("distilbert", "roberta")
    assert cfg.id2label == {0: "neutral", 1: "toxic"}
    assert AutoTokenizer.from_pretrained(path).get_vocab() != AutoTokenizer.from_pretrained(
        demo_assets["reward"]).get_vocab()
    judge = Judge(JudgeConfig(model="demo", label="toxic"), str(path), CPU)
    # the reward model's training sentences and summaries are held-out data for the judge
    tox = load_jsonl(DEMO_DATA_DIR / "toxicity.jsonl")
    p = judge.toxicity([r["text"] for r in tox])
    acc = ((p >= 0.5) == torch.tensor([r["label"] == "hate" for r in tox])).float().mean().item()
    summaries = [r["summary"] for r in load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")]
    ps = judge.toxicity(summaries)
    acc_s = ((ps >= 0.5) == torch.tensor([is_toxic_text(s) for s in summaries])).float().mean().item()
    assert acc > 0.85 and acc_s > 0.85, (acc, acc_s)
    assert build_demo_judge() == path                                         # cached


def test_multi_label_judges_use_a_sigmoid_and_labels_are_checked(test_models):
    judge = Judge(JudgeConfig(model="toxic-bert", label="insult"), str(test_models["bert_toxic"]), CPU)
    texts = ["you are an idiot", "thank you for the lamp"]
    logits = judge.term.logits(["", ""], texts, with_prompt=False)
    assert torch.allclose(judge.toxicity(texts), logits[:, 4].sigmoid())
    single = RewardTerm(RewardTermConfig(model="r", label="toxic", output="probability"),
                        str(test_models["roberta_toxicity"]), CPU, torch.float32)
    assert torch.allclose(single.label_probability(texts, "toxic"),
                          single.logits(["", ""], texts, with_prompt=False).softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="judge 'x'.*'neutral', 'toxic'"):
        Judge(JudgeConfig(model="m", name="x", label="hate"), str(test_models["roberta_toxicity"]), CPU)


def _doc(reward_change_low: float, judge_improvement: dict, share: float) -> dict:
    return {"baseline": "start", "settings": {"judges": [{"name": "j", "label": "toxic", "threshold": 0.5}],
                                             "confidence": 0.95},
            "policies": [{"label": "start", "metrics": {}}, {"label": "final", "metrics": {
                "vs_baseline": {"reward_mean_change": {"value": 1.0, "ci_low": reward_change_low, "ci_high": 2.0},
                                "judges": {"j": {"toxicity_mean_improvement": judge_improvement}}},
                "judges": {"j": {"reward_clean_judge_toxic": {"share": share, "examples": [
                    {"index": 3, "response": "a blind spot", "toxicity": 0.1, "judge": 0.9}]}}}}}]}


def test_flags_reward_gains_a_judge_does_not_confirm():
    confirmed = {"value": 0.4, "ci_low": 0.1, "ci_high": 0.6}
    unconfirmed = {"value": 0.05, "ci_low": -0.2, "ci_high": 0.3}
    assert M.judge_flags(_doc(0.5, confirmed, 0.0)) == []
    assert M.judge_flags(_doc(-0.1, unconfirmed, 0.2)) == []           # the reward did not clearly improve
    flags = M.judge_flags(_doc(0.5, unconfirmed, 0.25))
    assert len(flags) == 1 and flags[0]["judge"] == "j" and flags[0]["reward_clean_judge_toxic_share"] == 0.25
    assert flags[0]["examples"][0]["response"] == "a blind spot"


def test_mean_interval_contains_the_mean():
    x = np.random.default_rng(0).random(50)
    iv = M.mean_interval(x, 500, 0.95, 0)
    assert iv["value"] == pytest.approx(x.mean()) and iv["ci_low"] < iv["value"] < iv["ci_high"]


@pytest.mark.slow
def test_eval_flags_a_reward_gain_that_a_contrarian_judge_disputes(shipped_demo_run, demo_assets, tmp_path):
    """End to end: a "judge" that calls the reward model's own clean label toxic disputes every reward gain, so
    detoxrl-eval must flag the trained demo, with examples, in metrics.json and report.html."""
    from detoxrl.eval import cli

    _, run_dir = shipped_demo_run
    out = tmp_path / "eval"
    contrarian = f"judges=[{{model: {demo_assets['reward']}, label: nothate, name: contrarian}}]"
    assert cli.main([str(run_dir), contrarian, "--output", str(out), "--num-samples", "20", "--bootstrap", "300",
                     "--no-progress"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["policies"][1]["metrics"]["vs_baseline"]["reward_mean_change"]["ci_low"] > 0
    (flag,) = doc["flags"]
    assert flag["policy"] == "final" and flag["judge"] == "contrarian"
    assert flag["judge_toxicity_mean_improvement"] < 0 and flag["reward_clean_judge_toxic_share"] > 0.5
    assert flag["examples"] and all(e["toxicity"] < 0.5 <= e["judge"] for e in flag["examples"])
    page = (out / "report.html").read_text()
    assert "Flag:</b> the reward of final improved" in page and 'class="flag-examples"' in page
