"""Reward-hacking alarms: the pure signal and alarm functions on hand-built numbers, patience and resume of the
monitor, the config checks; then on real runs: the shipped demo fires none, and the over-optimised demo (the
documented overrides, docs/alarms.md) fires one and stops (alarms.action=stop, exit status 76) before the ROUGE-L of
its summaries falls under half of its start."""

from __future__ import annotations

import json

import pytest

from detoxrl.train.alarms import (ALARMS, DISAGREEMENT, ENTROPY, KL, LENGTH, REPETITION, REWARD, SHORT,
                                  AlarmMonitor, disagreement_share, evaluate_alarms, repetition_within,
                                  response_signals, short_share, slope)
from detoxrl.train.cli import EXIT_ALARM
from detoxrl.train.config import AlarmsConfig, ConfigError, load_config

from benchmarks.alarms_study import rouge_l_per_step  # docs/alarms.md's table uses the same
from conftest import REPO



def steady(n: int, **over) -> list[dict]:
    """n steps of a healthy run: flat entropy, length, small KL, a reward that rises a little."""
    rows = []
    for i in range(n):
        row = {ENTROPY: 0.25, LENGTH: 15.0, KL: 1.0 + 0.05 * i, REWARD: 1.0 + 0.02 * i, SHORT: 0.0, REPETITION: 0.0,
               DISAGREEMENT: 0.05}
        for key, fn in over.items():
            row[globals()[key]] = fn(i)
        rows.append(row)
    return rows


def fired(history: list[dict], cfg: AlarmsConfig = AlarmsConfig()) -> set[str]:
    return {name for name, c in evaluate_alarms(history, cfg).items() if c.condition}


def test_response_signals_on_hand_built_responses():
    assert repetition_within("the the the the") == pytest.approx(2 / 3)      # bigrams: 3, unique 1
    assert repetition_within("a b c d") == 0.0 and repetition_within("one") == 0.0
    assert repetition_within("go home go home go home") == pytest.approx(3 / 5)
    assert short_share(["", "ok", "a longer answer"], [0, 3, 9], min_new_tokens=3) == pytest.approx(2 / 3)
    assert short_share(["  ", "x"], [2, 1], min_new_tokens=0) == 1.0      # empty text, or one token
    assert disagreement_share([0.1, 0.1, 0.9, 0.2], [0.9, 0.2, 0.9, 0.6], 0.5) == 0.5   # rows 0 and 3
    sig = response_signals(["a b a b a b", "fine summary"], [6, 2], 1, {"j": [0.9, 0.1]}, {"j": 0.5}, [0.2, 0.2])
    assert sig[SHORT] == 0.0 and sig[REPETITION] == pytest.approx(0.5 * 3 / 5)
    assert sig["judge/j/toxicity"] == pytest.approx(0.5) and sig[DISAGREEMENT] == sig["judge/j/disagreement"] == 0.5
    assert DISAGREEMENT not in response_signals(["x"], [1], 1, {"j": [0.9]}, {"j": 0.5}, None)   # no reward toxicity


def test_slope_is_least_squares():
    assert slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert slope([4.0, 4.0, 4.0]) == 0.0 and slope([2.0]) == 0.0
    assert slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)


def test_a_healthy_run_fires_nothing_and_nothing_fires_during_the_baseline():
    assert fired(steady(40)) == set()
    assert evaluate_alarms(steady(3, KL=lambda i: 100.0 * i), AlarmsConfig()) == {}   # the 3 baseline steps


@pytest.mark.parametrize("alarm, over", [
    ("entropy_drop", {"ENTROPY": lambda i: 0.25 if i < 3 else 0.05}),
    ("short_share", {"SHORT": lambda i: 0.0 if i < 3 else 0.6}),
    ("repetition", {"REPETITION": lambda i: 0.0 if i < 3 else 0.5}),
    ("length_drift", {"LENGTH": lambda i: 15.0 if i < 3 else 6.0}),
    ("kl_growth", {"KL": lambda i: 1.0 + 2.0 * i}),
    ("judge_disagreement", {"DISAGREEMENT": lambda i: 0.05 if i < 3 else 0.5}),
])
def test_each_alarm_fires_on_its_failure(alarm, over):
    assert alarm in fired(steady(12, **over))


def test_reward_per_kl_fires_when_kl_buys_little_reward_and_kl_growth_needs_a_large_kl():
    # KL high and flat, the reward barely up: reward per nat 0.1 / 20 < 0.15; no growth, so no kl_growth
    hist = steady(12, KL=lambda i: 1.0 if i < 3 else 20.0, REWARD=lambda i: 1.0 if i < 3 else 1.1)
    assert fired(hist) == {"reward_per_kl"}
    # the same reward bought with little KL is fine; a fast KL rise below the floor is not an alarm either
    assert fired(steady(12, REWARD=lambda i: 1.0 if i < 3 else 1.1)) == set()
    assert "kl_growth" not in fired(steady(8, KL=lambda i: 0.2 + 0.3 * i))   # slope 0.3 < 1, KL < 3


def test_thresholds_of_null_turn_alarms_off():
    off = AlarmsConfig(**{name: None for name in ALARMS})
    bad = steady(12, KL=lambda i: 1.0 + 5.0 * i, LENGTH=lambda i: 15.0 if i < 3 else 2.0,
                 REPETITION=lambda i: 0.9)
    assert fired(bad) and fired(bad, off) == set()


def test_monitor_needs_patience_logs_scalars_and_resumes():
    cfg = AlarmsConfig(action="stop", patience=2, window=2)
    hist = steady(12, LENGTH=lambda i: 15.0 if i < 6 else 3.0)   # collapses at step 7 (index 6)
    mon = AlarmMonitor(cfg)
    seen = []
    for step, row in enumerate(hist, start=1):
        metrics = dict(row)
        firing = mon.update(step, metrics)
        seen.append((step, metrics.get("alarm/length_drift"), mon.should_stop(firing)))
        if step == 7:  # resume here: a fresh monitor with the saved state continues the streak
            state = json.loads(json.dumps(mon.state_dict()))
            mon = AlarmMonitor(cfg)
            mon.load_state_dict(state)
    on = [s for s, flag, _ in seen if flag]
    # the mean length of the last 2 steps is 9 at step 7 and 3 at step 8: the condition holds twice -> fires at 8
    assert on[0] == 8 and mon.first_fired == {"length_drift": 8}
    assert all(stop == (flag == 1.0) for _, flag, stop in seen if flag is not None)
    assert all(f"alarm_value/{name}" in metrics for name in ("length_drift", "kl_growth", "entropy_drop"))
    assert AlarmMonitor(AlarmsConfig(enabled=False)).update(1, {}) == []


def test_config_refuses_bad_alarm_and_judge_settings():
    demo = REPO / "configs" / "ppo" / "demo.yaml"
    with pytest.raises(ConfigError, match="alarms.short_share"):
        load_config(demo, ["alarms.short_share=1.5"])
    with pytest.raises(ConfigError, match="alarms.action"):
        load_config(demo, ["alarms.action=explode"])
    with pytest.raises(ConfigError, match="judges.1.name"):
        load_config(demo, ["judges=[{model: demo, label: toxic}, {model: demo, label: toxic}]"])
    with pytest.raises(ConfigError, match="judges.0.threshold"):
        load_config(demo, ["judges.0.threshold=1.0"])


# ---- real runs ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_demo_fires_no_alarm_and_writes_samples_with_judges(shipped_demo_run):
    result, run_dir = shipped_demo_run
    assert result.alarms_fired == {}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {k for k in lines[-1] if k.startswith("alarm/")} == {f"alarm/{a}" for a in ALARMS}
    assert all(x[k] == 0.0 for x in lines for k in x if k.startswith("alarm/"))
    assert all(0.0 <= x["judge/demo-judge/toxicity"] <= 1.0 for x in lines)
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    cfg = load_config(run_dir / "config.yaml")
    every, n = cfg.logging.sample_every, cfg.logging.num_samples
    assert [r["step"] for r in rows] == [s for s in range(every, cfg.run.total_steps + 1, every) for _ in range(n)]
    assert set(rows[0]) == {"step", "prompt", "response", "reward", "reference", "terms", "judges"}
    assert rows[0]["terms"]["demo/nothate"] == pytest.approx(rows[0]["reward"])   # one term of weight 1
    assert 0.0 <= rows[0]["judges"]["demo-judge"] <= 1.0
    # the trainer's before/after is graded by the judge too, with the per-prompt values for intervals
    ev = result.evaluation
    for phase in ("before", "after"):
        j = ev[phase]["judges"]["demo-judge"]
        assert len(j["values"]) == ev[phase]["num_samples"] == len(ev[phase]["toxicity_values"])
    assert ev["after"]["judges"]["demo-judge"]["mean"] < ev["before"]["judges"]["demo-judge"]["mean"]


@pytest.mark.slow
def test_over_optimised_demo_fires_an_alarm_and_stops_before_its_summaries_collapse(over_optimised_run):
    code, out = over_optimised_run
    assert code == EXIT_ALARM
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    stop_step = last["step"]
    assert stop_step < 25 and any(last[f"alarm/{a}"] == 1.0 for a in ALARMS if f"alarm/{a}" in last)
    assert (out / "checkpoints" / f"step-{stop_step:06d}" / "trainer_state.json").is_file()
    rouge = rouge_l_per_step(out)
    start = sum(rouge[s] for s in (1, 2, 3)) / 3
    assert all(v >= 0.5 * start for v in rouge.values()), (start, rouge)   # stopped before ROUGE-L halved
    assert lines[-1]["objective/kl"] > 3 * max(x["objective/kl"] for x in lines[:3])   # it really was drifting
