"""Scorer placement vs local placement, side by side in one run: the step time falls by the share that overlaps.

With `reward.placement: scorer` the reward classifier runs in a scorer process while the training rank computes its
reference log-probs, old log-probs and values (`--reference-scorer`: the reference copy on a scorer of its own too);
with `local` the rank does all of it in turn. The configuration makes reward scoring a large share of the step: a
RoBERTa classifier of roberta-base's size (hidden 768, 12 layers: the headline's reward model) next to a smaller
policy (a T5 of d_model 256, 4 layers), both random weights, built locally. On one 1-thread training rank the reward
then takes about as long as the rank's reference + old log-prob passes, the most the overlap can hide. The two placements alternate (local, scorer, local, scorer, ...) so that a changing machine
load hits both alike; each run is a separate `detoxrl-train` process on the CPU (one training rank; scorers are
extra processes).

    python -m benchmarks.scorer_overlap                      # 2 rounds x 2 placements, 8 steps each (2 warm-up)
    python -m benchmarks.scorer_overlap --rounds 3 --steps 8 --no-append --reference-scorer
    # the real layout, one 8-GPU node: 6 training ranks, the reward scorer on GPU 6, the reference scorer on GPU 7
    python -m benchmarks.scorer_overlap --launch "--strategy zero2 --num-processes 6 --mixed-precision bf16" \
        --reference-scorer --policy-size base --reward-size base --real-vocab --batch-size 64 --threads 0

It prints one JSON record per run and appends a Markdown section to benchmarks/RESULTS.md: step time, the phases
(reward, reference, old log-probs, time waiting on the scorers), and the expected saving (the local run's old
log-prob + reference time that the scorer run overlaps with the reward). The GPU command for the real layout
(6 training ranks, reward model and reference each on a spare GPU) is in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
PHASES = ("generate", "reward", "reference", "old_logprobs", "wait_reward", "wait_reference", "ppo_update")
PLACEMENTS = {"local": [], "scorer": ["reward.placement=scorer"]}


def build_assets(policy_size: str, reward_size: str, real_vocab: bool) -> dict[str, Path]:
    """A T5 policy and a RoBERTa reward (default: d_model 256 x 4 layers against roberta-base's hidden 768 x 12
    layers; `--policy-size base` makes the policy flan-t5-base-sized too), random weights, cached like the other sets."""
    from benchmarks.assets import REAL_VOCAB, ROBERTA_SIZES, T5_SIZES, ModelSet, build_model_set

    T5_SIZES.setdefault("mini", dict(d_model=256, d_ff=1024, num_layers=4, num_heads=4, d_kv=64))
    ROBERTA_SIZES.setdefault("medium", dict(hidden=512, layers=6, heads=8))
    return build_model_set(ModelSet("seq2seq", policy_size, reward_size, REAL_VOCAB["t5"] if real_vocab else None,
                                    prompt_chars=300, rows=256))


def overrides(paths: dict[str, Path], steps: int, batch: int, threads: int, out: Path) -> list[str]:
    # on the demo recipe's GAE path, one response per prompt (the demo itself runs RLOO with k = 4)
    return ["ppo.estimator=gae", "ppo.k=1", f"policy.model={paths['policy']}", f"reward.terms.0.model={paths['reward']}",
            f"data.dataset={paths['data']}", "data.reference_field=null", "data.max_prompt_tokens=64",
            f"run.total_steps={steps}", f"run.cpu_threads={threads or 'null'}", f"ppo.batch_size={batch}",
            f"ppo.mini_batch_size={batch}", "ppo.ppo_epochs=1", "generation.max_new_tokens=24",
            "generation.min_new_tokens=24", "reference.mode=copy", "reference.device=cpu",
            "reward.terms.0.batch_size=64", "evaluation.before_after=false", "logging.progress_bar=false",
            "logging.sample_every=0", "logging.tensorboard=false", "alarms.enabled=false", "judges=[]",
            f"run.output_dir={out}"]


def run_one(placement: str, args, paths: dict[str, Path], out: Path) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(args.threads)}
                                                                 if args.threads else {})}
    extra = [*PLACEMENTS[placement], *(["reference.placement=scorer"] if placement == "scorer" and
                                       args.reference_scorer else [])]
    launcher = ["-m", "detoxrl.launch", *args.launch.split(), "--run"] if args.launch else ["-m", "detoxrl.train"]
    argv = [sys.executable, *launcher, "--config", str(REPO / "configs/ppo/demo.yaml"),
            *overrides(paths, args.steps, args.batch_size, args.threads, out), *extra]
    load = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{placement} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    phases = {p: statistics.mean(m.get(f"time/{p}", 0.0) for m in metrics) for p in PHASES}
    return {"placement": placement, "step_seconds": statistics.mean(m["time/step"] for m in metrics),
            "step_seconds_median": statistics.median(m["time/step"] for m in metrics), "phases": phases,
            "timed_steps": len(metrics), "load_average_at_start": load, "wall_seconds": time.perf_counter() - t0,
            "reward_mean": statistics.mean(m["env/reward_mean"] for m in metrics)}


def summary(records: list[dict[str, Any]], reference_scorer: bool = False) -> dict[str, Any]:
    """Mean step times, the saving, and the saving the overlap allows: the local step runs reward, reference and old
    log-probs in turn; with scorers the rank's own passes run while the scorers work, so the step takes the longest
    of them instead of their sum (reward || reference + old log-probs; with a reference scorer reward || reference
    || old log-probs)."""
    by = {p: [r for r in records if r["placement"] == p] for p in PLACEMENTS}
    mean = {p: statistics.mean(r["step_seconds"] for r in rs) for p, rs in by.items()}
    ph = {p: {k: statistics.mean(r["phases"][k] for r in rs) for k in PHASES} for p, rs in by.items()}
    reward, ref, old = (ph["local"][k] for k in ("reward", "reference", "old_logprobs"))
    parallel = max(reward, ref, old) if reference_scorer else max(reward, ref + old)
    return {"local_step_s": mean["local"], "scorer_step_s": mean["scorer"],
            "saving_s": mean["local"] - mean["scorer"], "saving_share": 1 - mean["scorer"] / mean["local"],
            "expected_saving_s": reward + ref + old - parallel, "phases": ph}


def markdown(records: list[dict[str, Any]], s: dict[str, Any], args, machine: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [f"| {r['placement']} | {r['step_seconds']:.3f} | " + " | ".join(f"{r['phases'][p]:.3f}" for p in PHASES)
            + f" | {r['load_average_at_start'][0]} |" for r in records]
    ph = s["phases"]
    held = " and a reference scorer" if args.reference_scorer else " (the reference copy stays local)"
    return "\n".join([
        f"\n## Scorer overlap (CPU), {date}\n",
        f"`python -m benchmarks.scorer_overlap --rounds {args.rounds} --steps {args.steps} --warmup {args.warmup} "
        f"--batch-size {args.batch_size} --threads {args.threads} --policy-size {args.policy_size} "
        f"--reward-size {args.reward_size}"
        f"{' --reference-scorer' if args.reference_scorer else ''}`; machine: {machine['cpu']}, {machine['cores']} "
        f"cores (1-minute load average at the start of each run in the last column). "
        f"{'Launch: ' + args.launch if args.launch else 'One training rank'}; `scorer` adds a reward scorer "
        f"process{held}. Policy T5 `{args.policy_size}`, reward RoBERTa `{args.reward_size}` (benchmarks/assets.py "
        f"sizes, random weights); batch {args.batch_size}, 24 new tokens, 1 PPO epoch. Seconds per step, mean over "
        f"the timed steps:\n",
        "| placement | step | " + " | ".join(PHASES) + " | load |", "|---" * (len(PHASES) + 3) + "|", *rows, "",
        f"Mean step: local {s['local_step_s']:.3f} s, scorer {s['scorer_step_s']:.3f} s: "
        f"{'saved' if s['saving_s'] >= 0 else 'LOST'} {abs(s['saving_s']):.3f} s ({100 * s['saving_share']:+.1f}%). "
        f"The overlappable share of the local step (reward {ph['local']['reward']:.3f} s, reference "
        f"{ph['local']['reference']:.3f} s and old log-probs {ph['local']['old_logprobs']:.3f} s in turn, against the "
        f"longest of them{' each' if args.reference_scorer else ', reference + old log-probs on the rank'} in "
        f"parallel) is {s['expected_saving_s']:.3f} s; with scorers the rank waited "
        f"{ph['scorer']['wait_reward']:.3f} s on the reward scorer and {ph['scorer']['wait_reference']:.3f} s on the "
        f"reference scorer per step.", ""])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scorer_overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="local/scorer pairs to run (default 2)")
    p.add_argument("--steps", type=int, default=8, help="PPO steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (training ranks and scorers; "
                   "0: torch's default)")
    p.add_argument("--launch", default=None, help="detoxrl-launch arguments for several ranks, e.g. \"--strategy "
                   "zero2 --num-processes 6 --mixed-precision bf16\" (default: one process, no launcher)")
    p.add_argument("--policy-size", default="mini", help="T5 size (benchmarks/assets.py T5_SIZES; default mini)")
    p.add_argument("--reward-size", default="base", help="RoBERTa size (ROBERTA_SIZES, or `medium`: hidden 512 x 6 "
                   "layers; default base)")
    p.add_argument("--real-vocab", action="store_true", help="the models' published vocabulary sizes")
    p.add_argument("--reference-scorer", action="store_true", help="put the reference copy on a scorer too (a third "
                   "busy process: on a 2-core machine it competes with the training rank)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", type=Path, default=Path("/tmp/detoxrl-scorer-overlap"))
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    from benchmarks.ppo_throughput import machine

    paths = build_assets(args.policy_size, args.reward_size, args.real_vocab)
    records = []
    for k in range(args.rounds):
        for placement in PLACEMENTS:
            out = args.out / f"{placement}-{k}"
            if out.exists():
                import shutil
                shutil.rmtree(out)
            records.append(run_one(placement, args, paths, out))
            print(json.dumps(records[-1]), flush=True)
    s = summary(records, args.reference_scorer)
    print(json.dumps(s), flush=True)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write(markdown(records, s, args, machine()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
