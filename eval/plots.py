"""Training curves of a run, read from its TensorBoard event files and drawn with matplotlib (Agg, no display).

    detoxrl-eval plot RUN_DIR [--output DIR]     # PNGs in RUN_DIR/plots by default

Falls back to RUN_DIR/metrics.jsonl (the same scalars) when the run wrote no TensorBoard files.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Optional

log = logging.getLogger("detoxrl.eval")

# One figure per group; each panel lists the tags drawn in it (a tag ending in "*" is a prefix). Groups whose tags
# are all missing are skipped.
GROUPS: dict[str, dict] = {
    "reward": {"title": "Reward", "panels": [("reward (mean ± std over the batch)", ["env/reward_mean"]),
                                             ("reward terms (mean)", ["env/reward_term/*"])]},
    "kl": {"title": "KL to the reference", "panels": [("KL (nats per response)", ["objective/kl"])]},
    "kl_coef": {"title": "KL coefficient", "panels": [("beta", ["objective/kl_coef"])]},
    "losses": {"title": "Losses", "panels": [("policy loss", ["ppo/loss/policy"]), ("value loss", ["ppo/loss/value"]),
                                             ("total loss", ["ppo/loss/total"])]},
    "response_length": {"title": "Response length", "panels": [("tokens (mean)", ["env/response_length_mean"])]},
    "throughput": {"title": "Throughput", "panels": [("samples/s", ["perf/samples_per_s"]),
                                                     ("tokens/s", ["perf/tokens_per_s"])]},
    "policy_stats": {"title": "Policy statistics", "panels": [
        ("entropy", ["objective/entropy"]), ("clip fraction", ["ppo/policy/clipfrac"]),
        ("approx KL (old -> new)", ["ppo/policy/approx_kl"]), ("value explained variance",
                                                               ["ppo/val/explained_variance"])]},
}

Series = dict[str, tuple[list[int], list[float]]]


def read_scalars(run_dir: Path) -> tuple[Series, str]:
    """All scalar series {tag: (steps, values)} and where they came from."""
    tb = run_dir / "tensorboard"
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        series = {}
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            series[tag] = ([e.step for e in events], [e.value for e in events])
        return series, str(tb)
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        series: Series = {}
        for line in jsonl.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(v))
        return series, str(jsonl)
    return {}, ""


def _matching(series: Series, patterns: list[str]) -> list[str]:
    out = []
    for p in patterns:
        if p.endswith("*"):
            out += sorted(t for t in series if t.startswith(p[:-1]))
        elif p in series:
            out.append(p)
    return out


def render_training_curves(run_dir: Path) -> dict[str, bytes]:
    """{group name: PNG bytes} for every group with data."""
    series, origin = read_scalars(Path(run_dir))
    if not series:
        return {}
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    for name, group in GROUPS.items():
        panels = [(title, _matching(series, tags)) for title, tags in group["panels"]]
        # one reward term is the reward itself (unweighted): its panel only adds something for two or more terms
        panels = [(t, tags) for t, tags in panels if tags and not (t.startswith("reward terms") and len(tags) < 2)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, (title, tags) in zip(axes[0], panels):
            for tag in tags:
                steps, values = series[tag]
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.4,
                        label=tag.split("/", 2)[-1] if len(tags) > 1 else None)
                if tag == "env/reward_mean" and "env/reward_std" in series:
                    s_steps, stds = series["env/reward_std"]
                    std_at = dict(zip(s_steps, stds))
                    lo = [v - std_at.get(s, 0.0) for s, v in zip(steps, values)]
                    hi = [v + std_at.get(s, 0.0) for s, v in zip(steps, values)]
                    ax.fill_between(steps, lo, hi, alpha=0.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PPO step")
            ax.grid(alpha=0.3)
            if len(tags) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(f"{group['title']} — {Path(run_dir).name}", fontsize=11)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[name] = buf.getvalue()
    log.info("plotted %d groups of training curves from %s", len(out), origin)
    return out


def write_plots(run_dir: Path, output: Optional[Path] = None) -> list[Path]:
    """Write one PNG per group into `output` (default RUN_DIR/plots); returns the paths."""
    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "plots"
    images = render_training_curves(run_dir)
    if not images:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (tensorboard/) and no metrics.jsonl")
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in images.items():
        path = output / f"{name}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
