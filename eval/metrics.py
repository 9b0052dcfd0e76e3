"""Pure metric functions over per-sample arrays: summary statistics, paired bootstrap intervals, ROUGE, distinct-n.

Everything here takes plain lists / numpy arrays of one policy's samples (in prompt order), so the numbers depend
only on the samples, never on how the work was split across processes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from detoxrl.train.tracking import distinct_n, duplicate_share  # noqa: F401 (shared with training)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1, as torch's `.std()` in the trainer's before/after)."""
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def relative_improvement(baseline: float, value: float) -> Optional[float]:
    """(baseline - value) / |baseline|: positive when `value` is lower (less toxic, less spread). None if 0."""
    if baseline == 0:
        return None
    return (baseline - value) / abs(baseline)


def paired_bootstrap(baseline: np.ndarray, other: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                     n_resamples: int, confidence: float, seed: int) -> dict[str, Optional[float]]:
    """Point estimate and percentile confidence interval of `statistic(baseline, other)`.

    The two arrays are paired (same prompts, same order); each resample draws prompt indices with replacement and
    applies them to both, so prompt difficulty cancels out. Resamples where the statistic is undefined (None) are
    dropped; the interval is None if fewer than half remain.
    """
    baseline, other = np.asarray(baseline, np.float64), np.asarray(other, np.float64)
    if baseline.shape != other.shape:
        raise ValueError(f"paired bootstrap needs equal lengths, got {baseline.shape} and {other.shape}")
    point = statistic(baseline, other)
    out: dict[str, Optional[float]] = {"value": point, "ci_low": None, "ci_high": None,
                                       "confidence": confidence, "resamples": n_resamples}
    if n_resamples <= 0 or baseline.size < 2 or point is None:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, baseline.size, size=(n_resamples, baseline.size))
    stats = [statistic(baseline[i], other[i]) for i in idx]
    stats = np.array([s for s in stats if s is not None and np.isfinite(s)], dtype=np.float64)
    if stats.size < n_resamples / 2:
        return out
    alpha = (1.0 - confidence) / 2.0
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(stats, [alpha, 1.0 - alpha]))
    return out


def mean_interval(values: Sequence[float], n_resamples: int, confidence: float,
                  seed: int) -> dict[str, Optional[float]]:
    """The mean of one policy's per-sample values with a percentile bootstrap interval (resampling prompts)."""
    x = np.asarray(values, np.float64)
    return paired_bootstrap(x, x, lambda _, b: float(np.mean(b)), n_resamples, confidence, seed)


def judge_flags(doc: dict) -> list[dict]:
    """Policies whose reward improved on the baseline (interval above 0, or the point estimate without
    intervals) while a judge's toxicity did not improve (its interval reaches 0 or below): the reward may be
    gamed. One entry per (policy, judge), with the share of responses the reward's classifier calls clean but
    the judge calls toxic."""
    flags = []
    for p in doc["policies"][1:]:
        m = p["metrics"]
        vs = m.get("vs_baseline") or {}
        change = vs.get("reward_mean_change") or {}
        low = change.get("ci_low") if change.get("ci_low") is not None else change.get("value")
        if low is None or low <= 0:
            continue
        for name, jv in (vs.get("judges") or {}).items():
            imp = jv["toxicity_mean_improvement"]
            j_low = imp.get("ci_low") if imp.get("ci_low") is not None else imp.get("value")
            if j_low is None or j_low <= 0:
                missed = (m.get("judges") or {}).get(name, {}).get("reward_clean_judge_toxic") or {}
                flags.append({"policy": p["label"], "judge": name, "reward_mean_change": change.get("value"),
                              "judge_toxicity_mean_improvement": imp.get("value"),
                              "judge_improvement_ci": [imp.get("ci_low"), imp.get("ci_high")],
                              "reward_clean_judge_toxic_share": missed.get("share"),
                              "examples": missed.get("examples", [])})
    return flags


def mean_improvement(baseline: np.ndarray, other: np.ndarray) -> Optional[float]:
    return relative_improvement(float(np.mean(baseline)), float(np.mean(other)))


def std_improvement(baseline: np.ndarray, other: np.ndarray) -> Optional[float]:
    return relative_improvement(float(np.std(baseline, ddof=1)), float(np.std(other, ddof=1)))


def mean_difference(baseline: np.ndarray, other: np.ndarray) -> float:
    return float(np.mean(other) - np.mean(baseline))


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_per_sample(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measures per sample (Google's `rouge-score`, Porter stemming, as in most papers)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - the `eval` extra installs it
        raise ImportError("ROUGE needs the `rouge-score` package: pip install 'detoxrl[eval]'") from err
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in ROUGE_TYPES:
            out[k].append(float(scores[k].fmeasure))
    return out
