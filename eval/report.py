"""The evaluation's output folder: metrics.json, samples.csv, samples.md and one self-contained report.html
(metric table, training curves as embedded PNGs, sample table; no external resources)."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, Optional

from detoxrl.train.tracking import write_json

MD_PROMPT_CHARS = 300


def _num(v: Optional[float], digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _interval(d: Optional[dict], fmt) -> str:
    """A bootstrap dict {value, ci_low, ci_high} as `value [low, high]`, each number through `fmt`."""
    if not d or d.get("value") is None:
        return "—"
    text = fmt(d["value"])
    if d.get("ci_low") is not None:
        text += f" [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"
    return text


def _pct(d: Optional[dict]) -> str:
    """e.g. `+12.3% [+4.5%, +20.1%]`."""
    return _interval(d, lambda x: f"{100 * x:+.1f}%")


def _diff(d: Optional[dict]) -> str:
    return _interval(d, lambda x: f"{x:+.4f}")


def metric_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the metric table: one row per metric, one column per policy."""
    pols = doc["policies"]
    header = ["metric"] + [p["label"] for p in pols]
    tox = doc["settings"].get("toxicity") or {}
    conf = int(round(100 * doc["settings"].get("confidence", 0.95)))
    rows: list[list[str]] = []

    def row(name: str, fn) -> None:
        cells = []
        for p in pols:
            try:
                cells.append(fn(p["metrics"]))
            except (KeyError, TypeError):
                cells.append("—")
        if any(c != "—" for c in cells):
            rows.append([name] + cells)

    label = f"P({tox.get('label')})" if tox else "toxicity"
    num4 = lambda x: f"{x:.4f}"  # noqa: E731
    row(f"toxicity mean {label} (reward model) [{conf}% CI]",
        lambda m: _interval(m["toxicity"]["mean_interval"] if "mean_interval" in m["toxicity"]
                            else {"value": m["toxicity"]["mean"]}, num4))  # (older metrics.json: no interval)
    row("toxicity std", lambda m: _num(m["toxicity"]["std"]))
    row("toxicity share > 0.5", lambda m: _num(m["toxicity"]["share_above_0.5"], 3))
    row(f"toxicity mean improvement vs {doc['baseline']} [{conf}% CI]",
        lambda m: _pct(m["vs_baseline"]["toxicity_mean_improvement"]))
    row(f"toxicity std improvement vs {doc['baseline']} [{conf}% CI]",
        lambda m: _pct(m["vs_baseline"]["toxicity_std_improvement"]))
    for j in doc["settings"].get("judges") or []:
        name, jl = j["name"], f"P({j['label']})"
        row(f"judge {name}: toxicity mean {jl} [{conf}% CI]",
            lambda m, n=name: _interval(m["judges"][n]["mean_interval"], num4))
        row(f"judge {name}: share toxic ({jl} >= {j['threshold']:g})",
            lambda m, n=name: _num(m["judges"][n]["share_toxic"], 3))
        row(f"judge {name}: toxicity mean improvement vs {doc['baseline']} [{conf}% CI]",
            lambda m, n=name: _pct(m["vs_baseline"]["judges"][n]["toxicity_mean_improvement"]))
        row(f"judge {name}: share the reward model calls clean but the judge toxic",
            lambda m, n=name: _num(m["judges"][n]["reward_clean_judge_toxic"]["share"], 3))
    row("reward mean (weighted sum of terms)", lambda m: _num(m["reward"]["mean"]))
    row("reward std", lambda m: _num(m["reward"]["std"]))
    row(f"reward change vs {doc['baseline']} [{conf}% CI]", lambda m: _diff(m["vs_baseline"]["reward_mean_change"]))
    terms = list(pols[0]["metrics"].get("reward_terms") or {})
    if len(terms) > 1:
        for t in terms:
            row(f"term {t} mean", lambda m, t=t: _num(m["reward_terms"][t]["mean"]))
    for k, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
        row(f"{name} vs references", lambda m, k=k: _num(m["rouge"][k]))
    row("response length (tokens, mean)", lambda m: _num(m["response_length"]["mean_tokens"], 2))
    row("responses ending with EOS", lambda m: _num(m["response_length"]["ended_share"], 3))
    for k in (1, 2, 3):
        row(f"distinct-{k}", lambda m, k=k: _num(m["distinct"][f"distinct_{k}"], 3))
    row("duplicate responses", lambda m: _num(m["duplicate_share"], 3))
    row(f"KL to {doc['baseline']} (nats/response, mean)", lambda m: _num(m["kl_to_baseline"]["mean"]))
    row(f"KL to {doc['baseline']} (std)", lambda m: _num(m["kl_to_baseline"]["std"]))
    return header, rows


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def settings_summary(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    g = s["generation"]
    sampling = (f"sampling top_k={g['top_k']} top_p={g['top_p']} temperature={g['temperature']}"
                if g["do_sample"] else "greedy decoding")
    tox = s.get("toxicity") or {}
    tox_text = (f"toxicity = P({tox.get('label')}) of {tox.get('classifier')}" if not tox.get("skipped")
                else "toxicity skipped (the classifier has no such label)")
    judges = s.get("judges") or []
    judge_text = ("; judges: " + ", ".join(f"{j['name']} P({j['label']})" for j in judges)) if judges else \
        "; no judges"
    draws = s.get("samples_per_prompt", 1)
    prompts = f"{s['num_samples_used']} prompts" + (f" x {draws} samples" if draws > 1 else "")
    return (f"{prompts} from {s['dataset']} split {s['split']}; {sampling}, "
            f"{g['min_new_tokens']}-{s['max_new_tokens']} new tokens, seed {s['seed']} (chunks of "
            f"{s['batch_size']}); {tox_text}{judge_text}; baseline {doc['baseline']}; {s['world_size']} process(es).")


def _sample_columns(samples: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in samples:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def write_samples_csv(path: Path, samples: list[dict[str, Any]]) -> None:
    cols = _sample_columns(samples)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in samples:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + " …"


def samples_markdown(doc: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    header, rows = metric_table(doc)
    cols = _sample_columns(samples)
    shown = [{k: (_short(v, MD_PROMPT_CHARS) if k in ("prompt", "reference") else v) for k, v in r.items()}
             for r in samples]
    last = doc["policies"][-1]["label"]
    order = (f"sorted by reward difference ({last} minus {doc['baseline']}), largest first"
             if len(doc["policies"]) > 1 else "in prompt order")
    return "\n".join([
        "# Evaluation samples", "", settings_summary(doc), "", markdown_table(header, rows), "",
        f"## Samples ({order}; prompts cut to {MD_PROMPT_CHARS} characters here, in full in samples.csv)", "",
        markdown_table(cols, [[r.get(c) for c in cols] for r in shown]), ""])


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1400px;
color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
table.metrics td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
td.text{min-width:180px;max-width:420px}
div.prompt{max-height:9em;overflow:auto;white-space:pre-wrap;font-size:12px;color:#444}
.plots{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.plots img{max-width:100%;border:1px solid #ddd}
.good{background:#e9f7ec}.bad{background:#fdecea}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


def _flags_html(doc: dict[str, Any]) -> list[str]:
    """The reward-vs-judge section: a warning per flagged (policy, judge), with examples; or that none is flagged."""
    esc = html.escape
    if not doc["settings"].get("judges"):
        return ["<h2>Judges</h2><p>No judges configured (the recipe's <code>judges</code>): the toxicity above is the "
                "reward model grading itself.</p>"]
    flags = doc.get("flags") or []
    if not flags:
        return ["<h2 id=\"judges\">Judges</h2><p class=\"good\">No flag: wherever the reward improved, every judge "
                "confirmed it (its toxicity improvement interval lies above 0).</p>"]
    out = ["<h2 id=\"judges\">Judges</h2>"]
    for f in flags:
        share = f["reward_clean_judge_toxic_share"]
        ci = f["judge_improvement_ci"]
        out.append(f"<p class=\"bad flag\"><b>Flag:</b> the reward of {esc(f['policy'])} improved by "
                   f"{f['reward_mean_change']:+.4f}, but judge {esc(f['judge'])} does not confirm it (toxicity "
                   f"improvement {100 * (f['judge_toxicity_mean_improvement'] or 0):+.1f}%"
                   + (f", interval [{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]" if ci[0] is not None else "")
                   + ")" + (f"; {100 * share:.1f}% of its responses are clean for the reward model and toxic for "
                            f"the judge" if share is not None else "") + ".</p>")
        if f["examples"]:
            out.append("<table class=\"flag-examples\"><thead><tr><th>prompt #</th><th>response</th>"
                       "<th>reward-model toxicity</th><th>judge toxicity</th></tr></thead><tbody>")
            for e in f["examples"]:
                out.append(f"<tr><td>{e['index']}</td><td class=\"text\">{esc(e['response'])}</td>"
                           f"<td>{e['toxicity']:.4f}</td><td>{e['judge']:.4f}</td></tr>")
            out.append("</tbody></table>")
    return out


def render_html(doc: dict[str, Any], samples: list[dict[str, Any]], plots: dict[str, bytes]) -> str:
    esc = html.escape
    header, rows = metric_table(doc)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<title>detoxrl evaluation — {esc(' vs '.join(p['label'] for p in doc['policies']))}</title>",
             f"<style>{CSS}</style></head><body>",
             "<h1>detoxrl evaluation</h1>",
             f"<p>{esc(settings_summary(doc))}</p>",
             "<h2>Metrics</h2>", "<table class=\"metrics\" id=\"metrics\"><thead><tr>",
             "".join(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    parts.append("</tbody></table>")
    parts.extend(_flags_html(doc))
    parts.append("<h2>Policies</h2><table id=\"policies\"><thead><tr><th>label</th><th>source</th><th>base</th>"
                 "<th>adapter</th><th>step</th><th>adapter sha256</th></tr></thead><tbody>")
    for p in doc["policies"]:
        ident = p["identity"]
        parts.append("<tr>" + "".join(f"<td>{esc(str(v) if v is not None else '—')}</td>" for v in (
            p["label"], ident.get("source"), ident.get("base"), ident.get("adapter"), ident.get("step"),
            ident.get("adapter_sha256"))) + "</tr>")
    parts.append("</tbody></table>")
    parts.append("<h2>Training curves</h2>")
    if plots:
        parts.append("<div class=\"plots\">")
        for name, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img id=\"plot-{esc(name)}\" alt=\"{esc(name)}\" src=\"data:image/png;base64,{data}\">")
        parts.append("</div>")
    else:
        parts.append("<p>No training curves: no run directory with TensorBoard event files or metrics.jsonl.</p>")
    cols = _sample_columns(samples)
    last = doc["policies"][-1]["label"]
    parts.append(f"<h2>Samples</h2><p>{len(samples)} prompts"
                 + (f", sorted by reward difference ({esc(last)} minus {esc(doc['baseline'])}), largest first."
                    if len(doc["policies"]) > 1 else ".") + "</p>")
    parts.append("<table id=\"samples\"><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols)
                 + "</tr></thead><tbody>")
    for r in samples:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "prompt":
                cells.append(f"<td class=\"text\"><div class=\"prompt\">{esc(str(v))}</div></td>")
            elif isinstance(v, float):
                cls = ""
                if c.startswith("reward_diff_"):
                    cls = " class=\"good\"" if v > 0 else (" class=\"bad\"" if v < 0 else "")
                elif c.startswith("toxicity_diff_"):
                    cls = " class=\"good\"" if v < 0 else (" class=\"bad\"" if v > 0 else "")
                cells.append(f"<td{cls}>{v:.4f}</td>")
            elif isinstance(v, str):
                cells.append(f"<td class=\"text\">{esc(v)}</td>")
            else:
                cells.append(f"<td>{esc('' if v is None else str(v))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    parts.append("<h2>Settings</h2><pre>" + esc(json.dumps(doc["settings"], indent=2, sort_keys=True, default=str))
                 + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_dir: Path, doc: dict[str, Any], samples: list[dict[str, Any]],
                 run_dir: Optional[Path]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "metrics.json", doc)
    write_samples_csv(output_dir / "samples.csv", samples)
    (output_dir / "samples.md").write_text(samples_markdown(doc, samples), encoding="utf-8")
    plots: dict[str, bytes] = {}
    if run_dir is not None:
        from detoxrl.eval.plots import render_training_curves
        plots = render_training_curves(Path(run_dir))
    (output_dir / "report.html").write_text(render_html(doc, samples, plots), encoding="utf-8")
