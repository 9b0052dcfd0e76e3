"""The table of docs/alarms.md from finished runs: when each run's summaries collapsed, which alarms fired first.

    python -m benchmarks.alarms_study LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each run must have logged every step's responses (`logging.sample_every=1 logging.num_samples=16`). Per run: the
mean ROUGE-L F of each step's logged responses against their reference summaries (start = mean of steps 1-3), the
first step under half the start, the first step each alarm fired (metrics.jsonl `alarm/*`), the held-out
before -> after toxicity of the reward model and of the first judge (eval_before_after.json), and the KL and ROUGE-L
at the last step. Prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def rouge_l_per_step(run_dir: Path) -> dict[int, float]:
    """Mean ROUGE-L F of each step's logged responses against their references (eval.metrics.rouge_per_sample)."""
    from detoxrl.eval.metrics import rouge_per_sample

    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    rouge_l = rouge_per_sample([r["response"] for r in rows], [r["reference"] for r in rows])["rougeL"]
    per_step = defaultdict(list)
    for row, value in zip(rows, rouge_l):
        per_step[row["step"]].append(value)
    return {s: sum(v) / len(v) for s, v in sorted(per_step.items())}


def study_row(label: str, run_dir: Path) -> str:
    rouge = rouge_l_per_step(run_dir)
    start = sum(rouge[s] for s in (1, 2, 3)) / 3
    halved = next((s for s, v in rouge.items() if v < 0.5 * start), None)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first: dict[str, int] = {}
    for row in lines:
        for key, value in row.items():
            if key.startswith("alarm/") and value == 1.0:
                first.setdefault(key[len("alarm/"):], row["step"])
    alarms = ", ".join(f"{a} @ {s}" for a, s in sorted(first.items(), key=lambda x: x[1])) or "none"
    ba_path = run_dir / "eval_before_after.json"
    ba = json.loads(ba_path.read_text()) if ba_path.is_file() else {}
    if "after" in ba:
        judge = next(iter(ba["before"]["judges"]))
        tox = f"{ba['before']['toxicity_mean']:.3f} -> {ba['after']['toxicity_mean']:.3f}"
        jtox = f"{ba['before']['judges'][judge]['mean']:.3f} -> {ba['after']['judges'][judge]['mean']:.3f}"
    else:
        tox = jtox = "(no after: stopped)"
    last = lines[-1]
    return (f"| {label} | {start:.2f} | {halved or 'never'} | {alarms} | {tox} | {jtox} | "
            f"{last['objective/kl']:.1f} | {rouge[max(rouge)]:.2f} |")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    print("| run | ROUGE-L start | first step with ROUGE-L < half the start | alarms (first step) | held-out "
          "reward-model toxicity before -> after | held-out judge toxicity before -> after | KL at the last step "
          "(nats) | ROUGE-L at the last step |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in args:
        label, _, path = arg.partition("=")
        print(study_row(label, Path(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
