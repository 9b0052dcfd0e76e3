"""`detoxrl-eval compare RUN_DIR RUN_DIR...`: several training runs side by side, in one HTML page and a JSON file.

    settings    the keys of the runs' config.yaml that differ
    curves      reward, judge toxicity, KL, entropy, response length and samples/s, one line per run (metrics.jsonl or
                TensorBoard, through plots.read_scalars), with the step each run's first alarm fired
    final       the trainer's held-out before/after (eval_before_after.json): reward-model and judge toxicity and
                the reward, with bootstrap intervals over the prompts
    responses   each run's final response to the same held-out prompts, side by side (the seeds' "happy vs
                pessimistic" table), with the start policy's for reference
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from detoxrl.eval import metrics as M
from detoxrl.eval.plots import read_scalars
from detoxrl.eval.report import CSS
from detoxrl.train.tracking import write_json

log = logging.getLogger("detoxrl.eval")

# (panel title, tag pattern) of the overlaid curves
CURVES = [("reward (mean)", "env/reward_mean"), ("judge toxicity (mean P)", "judge/*/toxicity"),
          ("KL to the reference (nats)", "objective/kl"), ("policy entropy", "objective/entropy"),
          ("response length (tokens)", "env/response_length_mean"), ("samples/s", "perf/samples_per_s")]
SIDE_BY_SIDE = 12


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "l": [{"x": 2}]} -> {"a.b": 1, "l.0.x": 2}."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): d}


def settings_diff(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """{dotted key: [value in run 0, run 1, ...]} for the keys whose values differ (missing = None)."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def first_alarms(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, int]:
    """{alarm name: first step its alarm/<name> scalar was 1}."""
    out = {}
    for tag, (steps, values) in series.items():
        if tag.startswith("alarm/"):
            fired = [s for s, v in zip(steps, values) if v >= 0.5]
            if fired:
                out[tag.split("/", 1)[1]] = min(fired)
    return out


def _with_interval(values: Optional[list[float]], seed: int, n_resamples: int = 2000) -> Optional[dict[str, Any]]:
    if not values:
        return None
    return M.mean_interval(np.asarray(values, np.float64), n_resamples, 0.95, seed)


def final_metrics(ba: Optional[dict[str, Any]], seed: int = 0) -> Optional[dict[str, Any]]:
    """Means with 95% bootstrap intervals of the trainer's before/after, per phase: reward-model toxicity, reward,
    each judge."""
    if not ba or "before" not in ba:
        return None
    out: dict[str, Any] = {}
    for phase in ("before", "after"):
        if phase not in ba:  # a run an alarm or a signal stopped has no final evaluation
            continue
        e = ba[phase]
        out[phase] = {"num_samples": e["num_samples"],
                      "toxicity": _with_interval(e.get("toxicity_values"), seed) or {"value": e["toxicity_mean"]},
                      "reward": _with_interval(e.get("reward_values"), seed) or {"value": e["reward_mean"]},
                      "judges": {name: {"label": j["label"], **(_with_interval(j.get("values"), seed) or
                                                                {"value": j["mean"]})}
                                 for name, j in (e.get("judges") or {}).items()}}
    return out


def load_run(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a detoxrl run directory?)")
    series, origin = read_scalars(run_dir)
    ba_path = run_dir / "eval_before_after.json"
    ba = json.loads(ba_path.read_text()) if ba_path.is_file() else None
    return {"dir": str(run_dir), "config": yaml.safe_load(cfg_path.read_text()), "series": series, "origin": origin,
            "before_after": ba}


def unique_run_labels(dirs: list[Path]) -> list[str]:
    labels, seen = [], {}
    for d in dirs:
        name = Path(os.path.abspath(d)).name  # not resolve(): a symlinked run keeps the name it was given
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


def side_by_side(labels: list[str], runs: list[dict[str, Any]], n: int = SIDE_BY_SIDE) -> list[dict[str, Any]]:
    """Rows for the first `n` held-out prompts of the first run with a final evaluation: its start policy's
    response, then each run's final response to the same prompt with its reward-model and judge toxicity (None for
    a run without that prompt or without a final evaluation, e.g. one an alarm stopped)."""
    evals = [r["before_after"] if r["before_after"] and (r["before_after"].get("after") or {}).get("prompts")
             else None for r in runs]
    first = next((e for e in evals if e is not None), None)
    if first is None:
        return []
    index = [{p: k for k, p in enumerate(e["after"]["prompts"])} if e else {} for e in evals]
    rows = []
    for k0, p in enumerate(first["after"]["prompts"][:n]):
        row: dict[str, Any] = {"prompt": p, "start": first["before"]["responses"][k0],
                               "start_toxicity": first["before"]["toxicity_values"][k0]}
        for label, e, ix in zip(labels, evals, index):
            k = ix.get(p)
            a = e["after"] if e else None
            row[label] = None if k is None else {
                "response": a["responses"][k], "toxicity": a["toxicity_values"][k],
                "judges": {name: j["values"][k] for name, j in (a.get("judges") or {}).items()}}
        rows.append(row)
    return rows


def render_curves(labels: list[str], runs: list[dict[str, Any]]) -> Optional[bytes]:
    """One PNG, a panel per curve, one line per run; a dotted vertical line where a run's first alarm fired."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = []
    for title, tag in CURVES:
        lines = []
        for label, run in zip(labels, runs):
            tags = sorted(t for t in run["series"] if fnmatch.fnmatchcase(t, tag))
            for t in tags:
                name = label if len(tags) == 1 else f"{label} {t.split('/')[1]}"
                lines.append((name, label, run["series"][t]))
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    alarms = {label: first_alarms(run["series"]) for label, run in zip(labels, runs)}
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, label, (steps, values) in lines:
            ax.plot(steps, values, color=colors[label], linewidth=1.3, label=name)
        for label, fired in alarms.items():
            if fired:
                ax.axvline(min(fired.values()), color=colors[label], linestyle=":", linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training curves (dotted: a run's first alarm)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def compare_runs(run_dirs: list[Path], output: Path) -> dict[str, Any]:
    """Write compare.json and compare.html into `output`; returns the JSON document."""
    if len(run_dirs) < 2:
        raise ValueError("compare needs at least two run directories")
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = unique_run_labels([Path(d) for d in run_dirs])
    doc = {
        "runs": [{"label": label, "dir": r["dir"], "curves_from": r["origin"],
                  "steps": max((max(s) for s, _ in r["series"].values() if s), default=0),
                  "alarms_first_fired": first_alarms(r["series"]),
                  "final": final_metrics(r["before_after"], seed=0)} for label, r in zip(labels, runs)],
        "settings_diff": settings_diff([r["config"] for r in runs]),
        "curves": {label: {t: {"steps": r["series"][t][0], "values": r["series"][t][1]}
                           for _, tag in CURVES for t in r["series"] if fnmatch.fnmatchcase(t, tag)}
                   for label, r in zip(labels, runs)},
        "responses": side_by_side(labels, runs),
    }
    png = render_curves(labels, runs)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "compare.json", doc)
    (output / "compare.html").write_text(render_compare_html(doc, labels, png), encoding="utf-8")
    log.info("comparison of %d runs written to %s", len(runs), output)
    return doc


def _ci(d: Optional[dict[str, Any]]) -> str:
    if not d or d.get("value") is None:
        return "—"
    text = f"{d['value']:.4f}"
    if d.get("ci_low") is not None:
        text += f" [{d['ci_low']:.4f}, {d['ci_high']:.4f}]"
    return text


def render_compare_html(doc: dict[str, Any], labels: list[str], png: Optional[bytes]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>detoxrl comparison — {esc(' vs '.join(labels))}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>detoxrl comparison: {esc(' vs '.join(labels))}</h1>"]
    parts.append("<h2>Runs</h2><table id=\"runs\"><thead><tr><th>run</th><th>folder</th><th>steps</th>"
                 "<th>alarms (first step)</th></tr></thead><tbody>")
    for r in doc["runs"]:
        fired = ", ".join(f"{k} @ {v}" for k, v in sorted(r["alarms_first_fired"].items(), key=lambda kv: kv[1]))
        cls = ' class="bad"' if fired else ' class="good"'
        parts.append(f"<tr><td>{esc(r['label'])}</td><td>{esc(r['dir'])}</td><td>{r['steps']}</td>"
                     f"<td{cls}>{esc(fired or 'none')}</td></tr>")
    parts.append("</tbody></table>")
    parts.append("<h2>Settings that differ</h2>")
    if doc["settings_diff"]:
        parts.append("<table id=\"settings\"><thead><tr><th>key</th>" + "".join(f"<th>{esc(x)}</th>" for x in labels)
                     + "</tr></thead><tbody>")
        for key, values in doc["settings_diff"].items():
            parts.append(f"<tr><td>{esc(key)}</td>" + "".join(f"<td>{esc(json.dumps(v))}</td>" for v in values)
                         + "</tr>")
        parts.append("</tbody></table>")
    else:
        parts.append("<p>None: the runs have the same config.yaml.</p>")
    parts.append("<h2>Training curves</h2>")
    if png:
        parts.append(f"<div class=\"plots\"><img id=\"curves\" alt=\"training curves\" "
                     f"src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\"></div>")
    else:
        parts.append("<p>No curves: the runs have no metrics.jsonl or TensorBoard files.</p>")
    parts.append("<h2>Held-out evaluation (trainer's before/after, 95% bootstrap intervals)</h2>")
    parts.append("<table class=\"metrics\" id=\"final\"><thead><tr><th>metric</th>"
                 + "".join(f"<th>{esc(x)} before</th><th>{esc(x)} after</th>" for x in labels) + "</tr></thead><tbody>")
    finals = [r["final"] for r in doc["runs"]]
    judge_names = sorted({n for f in finals if f for e in f.values() for n in e["judges"]})
    rows = [("reward-model toxicity (mean P)", lambda e: e["toxicity"]), ("reward (mean)", lambda e: e["reward"])]
    rows += [(f"judge {n} toxicity (mean P)", lambda e, n=n: e["judges"].get(n)) for n in judge_names]
    for name, get in rows:
        cells = []
        for f in finals:
            cells += [_ci(get(f[p])) if f and p in f else "—" for p in ("before", "after")]
        parts.append(f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    parts.append("<h2>Responses to the same held-out prompts</h2>")
    if doc["responses"]:
        parts.append("<table id=\"responses\"><thead><tr><th>prompt</th><th>start</th>"
                     + "".join(f"<th>{esc(x)}</th>" for x in labels) + "</tr></thead><tbody>")
        for row in doc["responses"]:
            cells = [f"<td class=\"text\"><div class=\"prompt\">{esc(row['prompt'])}</div></td>",
                     f"<td class=\"text\">{esc(row['start'])}<br><small>tox {row['start_toxicity']:.3f}</small></td>"]
            for x in labels:
                r = row[x]
                if r is None:
                    cells.append("<td>— (no final held-out evaluation)</td>")
                    continue
                judged = " ".join(f"{esc(n)} {v:.3f}" for n, v in r["judges"].items())
                cells.append(f"<td class=\"text\">{esc(r['response'])}<br><small>tox {r['toxicity']:.3f}"
                             f"{'; ' + judged if judged else ''}</small></td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    else:
        parts.append("<p>No common held-out prompts: train with evaluation.before_after=true and the same data and "
                     "evaluation settings.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
