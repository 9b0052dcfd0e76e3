"""The demo over several training seeds: what `make demo` prints, how much it varies, and that the trainer and
detoxrl-eval print the same figures.

    python -m benchmarks.demo_seeds [--seeds 0,1,2,3,4] [--out DIR] [--reuse] [--results benchmarks/RESULTS.md]

Per seed: `detoxrl-train run.seed=S run.output_dir=DIR/demo_seedS` (the shipped demo recipe otherwise), then
`detoxrl-eval DIR/demo_seedS` (start vs final, the recipe's evaluation settings: 40 held-out prompts x 8 samples).
Prints one JSON line per seed and a summary line (mean and range over seeds of the trainer's before/after
toxicity, its change, the judge's, and the largest difference between the trainer's and detoxrl-eval's figures),
and appends a Markdown table to RESULTS.md. `--reuse` keeps runs already in DIR that have both files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.ppo_throughput import RESULTS, machine

BIN = Path(sys.executable).parent


def run_seed(seed: int, out: Path, reuse: bool) -> dict:
    run_dir = out / f"demo_seed{seed}"
    ba_path, metrics_path = run_dir / "eval_before_after.json", run_dir / "eval" / "metrics.json"
    times = {}
    if not (reuse and ba_path.is_file() and metrics_path.is_file()):
        for name, argv in (("train_s", [str(BIN / "detoxrl-train"), f"run.seed={seed}", f"run.output_dir={run_dir}",
                                        "logging.progress_bar=false"]),
                           ("eval_s", [str(BIN / "detoxrl-eval"), str(run_dir), "--no-progress"])):
            t0 = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed}: {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            times[name] = round(time.perf_counter() - t0, 1)
    ba = json.loads(ba_path.read_text())
    start, final = (p["metrics"] for p in json.loads(metrics_path.read_text())["policies"])
    judge = next(iter(ba["before"]["judges"]))
    pairs = [(ba["before"]["toxicity_mean"], start["toxicity"]["mean"]),
             (ba["after"]["toxicity_mean"], final["toxicity"]["mean"]),
             (ba["before"]["judges"][judge]["mean"], start["judges"][judge]["mean"]),
             (ba["after"]["judges"][judge]["mean"], final["judges"][judge]["mean"])]
    return {"seed": seed, "responses": ba["before"]["num_samples"],
            "before": ba["before"]["toxicity_mean"], "after": ba["after"]["toxicity_mean"],
            "change_pct": ba["toxicity_change_pct"],
            "after_ci": [final["toxicity"]["mean_interval"]["ci_low"], final["toxicity"]["mean_interval"]["ci_high"]],
            "judge_before": ba["before"]["judges"][judge]["mean"], "judge_after": ba["after"]["judges"][judge]["mean"],
            "rougeL": [start["rouge"]["rougeL"], final["rouge"]["rougeL"]], "kl": final["kl_to_baseline"]["mean"],
            "trainer_vs_eval_max_diff": max(abs(a - b) for a, b in pairs), **times}


def _machine_text() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, GPU: {m['gpu'] or 'none'}"


def _span(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))} .. {fmt.format(max(values))})"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"\n## demo over {len(rows)} training seeds ({_dt.date.today().isoformat()})\n",
             f"Command: `{command}`. Machine: {_machine_text()}.\n",
             "| seed | responses | toxicity before | after [95% CI] | change | judge before -> after | ROUGE-L start -> "
             "final | KL | trainer vs eval max diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['responses']} | {r['before']:.4f} | {r['after']:.4f} [{r['after_ci'][0]:.4f}, "
                     f"{r['after_ci'][1]:.4f}] | {r['change_pct']:+.1f}% | {r['judge_before']:.4f} -> "
                     f"{r['judge_after']:.4f} | {r['rougeL'][0]:.3f} -> {r['rougeL'][1]:.3f} | {r['kl']:.2f} | "
                     f"{r['trainer_vs_eval_max_diff']:.1e} |")
    lines.append(f"\nMean (range) over seeds: toxicity before {_span([r['before'] for r in rows])}, after "
                 f"{_span([r['after'] for r in rows])}, change {_span([r['change_pct'] for r in rows], '{:+.1f}%')}; "
                 f"judge after {_span([r['judge_after'] for r in rows])}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_seeds", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    p.add_argument("--reuse", action="store_true", help="keep runs in --out that already have both result files")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, args.out, args.reuse))
        print(json.dumps(rows[-1]), flush=True)
    command = "python -m benchmarks.demo_seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip())
    print(table)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
