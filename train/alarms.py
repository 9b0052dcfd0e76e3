"""Reward-hacking alarms: named conditions on the per-step metrics that say "the reward is being gamed".

    signals    per step, from the rollout: share of empty / minimum-length responses, repetition within a
               response, judge toxicity and judge-vs-reward disagreement (`response_signals`)
    alarms     per step, from the history of the logged metrics: entropy drop, short responses, repetition,
               length drift, KL growth rate, reward gained per nat of KL, judge disagreement (`evaluate_alarms`)
    monitor    patience (consecutive steps), TensorBoard scalars `alarm/<name>` (0/1) and `alarm_value/<name>`,
               a console warning when an alarm starts firing, and whether the run should stop (`AlarmMonitor`)

Everything but the monitor is a pure function of plain numbers, unit-tested in tests/test_alarms.py; docs/alarms.md
says what each alarm catches and why its default threshold is what it is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from detoxrl.train.config import AlarmsConfig

log = logging.getLogger("detoxrl.alarms")

# The per-step metrics the alarms read (names as in TensorBoard / metrics.jsonl).
ENTROPY, KL, REWARD, LENGTH = "objective/entropy", "objective/kl", "env/reward_mean", "env/response_length_mean"
SHORT, REPETITION, DISAGREEMENT = "hacking/short_share", "hacking/repetition", "hacking/judge_disagreement"
WATCHED = (ENTROPY, KL, REWARD, LENGTH, SHORT, REPETITION, DISAGREEMENT)
ALARMS = ("entropy_drop", "short_share", "repetition", "length_drift", "kl_growth", "reward_per_kl",
          "judge_disagreement")


# --------------------------------------------------------------------------------------------------------------
# Signals of one step's responses
# --------------------------------------------------------------------------------------------------------------
def repetition_within(text: str, n: int = 2) -> float:
    """Share of a response's word n-grams that repeat an earlier n-gram of the same response (0 = none repeat;
    "the the the the" -> 2/3 for bigrams). 0 for responses shorter than n + 1 words."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def short_share(texts: Sequence[str], lengths: Sequence[int], min_new_tokens: int) -> float:
    """Share of responses that are empty (no text once special tokens are dropped) or no longer than the minimum
    the sampler enforces: a policy that learned "say as little as possible" sits on that floor."""
    if not texts:
        return 0.0
    floor = max(1, min_new_tokens)
    return sum(1 for t, n in zip(texts, lengths, strict=True) if not t.strip() or n <= floor) / len(texts)


def disagreement_share(reward_toxicity: Sequence[float], judge_toxicity: Sequence[float],
                       judge_threshold: float, reward_threshold: float = 0.5) -> float:
    """Share of responses the reward's classifier calls clean (P < reward_threshold) but the judge calls toxic
    (P >= judge_threshold): the reward model's blind spots that the policy may have found."""
    pairs = list(zip(reward_toxicity, judge_toxicity, strict=True))
    if not pairs:
        return 0.0
    return sum(1 for r, j in pairs if r < reward_threshold and j >= judge_threshold) / len(pairs)


def response_signals(texts: Sequence[str], lengths: Sequence[int], min_new_tokens: int,
                     judge_toxicity: Mapping[str, Sequence[float]], judge_thresholds: Mapping[str, float],
                     reward_toxicity: Optional[Sequence[float]]) -> dict[str, float]:
    """This rank's per-step signals (means, so averaging over ranks of equal batch size gives the global value).

    `judge_toxicity` {judge name: P(toxic) per response}; `reward_toxicity` P(toxic) per response from the
    reward's own classifier (None when it has no toxic label): disagreement needs both.
    """
    out = {SHORT: short_share(texts, lengths, min_new_tokens),
           REPETITION: sum(repetition_within(t) for t in texts) / len(texts) if texts else 0.0}
    worst = None
    for name, tox in judge_toxicity.items():
        out[f"judge/{name}/toxicity"] = sum(tox) / len(tox) if tox else 0.0
        if reward_toxicity is not None and tox:
            share = disagreement_share(reward_toxicity, tox, judge_thresholds[name])
            out[f"judge/{name}/disagreement"] = share
            worst = share if worst is None else max(worst, share)
    if worst is not None:
        out[DISAGREEMENT] = worst
    return out


# --------------------------------------------------------------------------------------------------------------
# Alarms over the history of the metrics
# --------------------------------------------------------------------------------------------------------------
def slope(values: Sequence[float]) -> float:
    """Least-squares slope per step of equally spaced values (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


@dataclass
class Check:
    """One alarm on one step: the measured value and whether its condition holds (None: not measurable yet)."""
    value: Optional[float]
    condition: bool


def _series(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(h[key]) for h in history if h.get(key) is not None and math.isfinite(float(h[key]))]


def evaluate_alarms(history: Sequence[Mapping[str, Any]], cfg: AlarmsConfig) -> dict[str, Check]:
    """The condition of every enabled alarm after the last step of `history` (one metrics dict per step, oldest
    first). Nothing holds during the first `cfg.baseline_steps` steps: their mean is each signal's start. "Recent"
    values are means over the last `cfg.window` steps, so one noisy batch of 16 responses does not decide."""
    out: dict[str, Check] = {}
    if len(history) <= cfg.baseline_steps:
        return out
    b, w = cfg.baseline_steps, cfg.window

    def start(key: str) -> Optional[float]:
        values = _series(history, key)
        return sum(values[:b]) / b if len(values) >= b else None

    def recent(key: str) -> Optional[float]:
        values = _series(history[b:], key)[-w:]  # after the baseline steps only
        return sum(values) / len(values) if values else None

    if cfg.entropy_drop is not None and (s := start(ENTROPY)) and s > 0 and (r := recent(ENTROPY)) is not None:
        out["entropy_drop"] = Check(r / s, r / s < 1.0 - cfg.entropy_drop)
    if cfg.short_share is not None and (s := start(SHORT)) is not None and (r := recent(SHORT)) is not None:
        out["short_share"] = Check(r, r > cfg.short_share and r >= s + 0.1)
    if cfg.repetition is not None and (r := recent(REPETITION)) is not None:
        out["repetition"] = Check(r, r > cfg.repetition)
    if cfg.length_drift is not None and (s := start(LENGTH)) and (r := recent(LENGTH)) is not None:
        out["length_drift"] = Check(r / s - 1.0, abs(r / s - 1.0) > cfg.length_drift)
    kl_recent = recent(KL)
    if cfg.kl_growth is not None and kl_recent is not None:
        growth = slope(_series(history, KL)[-w:])
        out["kl_growth"] = Check(growth, growth > cfg.kl_growth and kl_recent > cfg.kl_floor)
    if cfg.reward_per_kl is not None and kl_recent is not None and (s := start(REWARD)) is not None \
            and (r := recent(REWARD)) is not None:
        per_kl = (r - s) / kl_recent if kl_recent > cfg.kl_floor else None
        out["reward_per_kl"] = Check(per_kl, per_kl is not None and per_kl < cfg.reward_per_kl)
    if cfg.judge_disagreement is not None and (r := recent(DISAGREEMENT)) is not None:
        s = start(DISAGREEMENT) or 0.0
        out["judge_disagreement"] = Check(r, r > cfg.judge_disagreement and r >= s + 0.1)
    return out


class AlarmMonitor:
    """Applies `evaluate_alarms` step after step with patience; resumable (`state_dict`)."""

    def __init__(self, cfg: AlarmsConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, float]] = []   # the watched metrics of every step so far
        self.streak = {name: 0 for name in ALARMS}
        self.first_fired: dict[str, int] = {}       # alarm -> the step it first fired

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Record `step`'s metrics, add `alarm/<name>` (0/1) and `alarm_value/<name>` to `metrics`, warn for each
        alarm that starts firing; returns the alarms firing at this step."""
        if not self.cfg.enabled:
            return []
        self.history.append({k: metrics[k] for k in WATCHED if metrics.get(k) is not None})
        firing = []
        for name, check in evaluate_alarms(self.history, self.cfg).items():
            self.streak[name] = self.streak[name] + 1 if check.condition else 0
            on = self.streak[name] >= self.cfg.patience
            metrics[f"alarm/{name}"] = float(on)
            if check.value is not None:
                metrics[f"alarm_value/{name}"] = check.value
            if on:
                firing.append(name)
                if name not in self.first_fired:
                    self.first_fired[name] = step
                    log.warning("step %d: reward-hacking alarm %r fired (value %.4g; threshold alarms.%s=%s, held %d "
                                "steps); see docs/alarms.md", step, name, check.value, name, getattr(self.cfg, name),
                                self.streak[name])
        return firing

    def should_stop(self, firing: Sequence[str]) -> bool:
        return self.cfg.action == "stop" and bool(firing)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "streak": self.streak, "first_fired": self.first_fired}

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        if not state:
            return
        self.history = [dict(h) for h in state["history"]]
        self.streak = {**self.streak, **state["streak"]}
        self.first_fired = {k: int(v) for k, v in state["first_fired"].items()}
