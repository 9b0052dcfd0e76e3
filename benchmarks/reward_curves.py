"""Learning per step, not only speed: detoxrl and TRL 1.12's PPO on the same causal toy, several seeds.

    python -m benchmarks.reward_curves [--seeds 0,1,2] [--steps 20] [--lr 1e-3] [--threads N] [--no-append]

The toy (benchmarks/assets.py `build_causal_toy`): a tiny GPT-2 fine-tuned on toy movie reviews, half positive and
half negative; the reward is a tiny GPT-2 sentiment classifier on the SAME tokenizer (TRL's PPO requires that) with
one logit, positive minus negative. Prompts are the first 4 tokens of a review, responses exactly 16 tokens; batch 16,
mini-batch 4, 4 PPO epochs, LoRA r=16 on c_attn, fixed KL coefficient 0.05, no gradient clipping, constant learning
rate: the settings of the `tiny-gpt2-causal` throughput configuration. Both systems log the mean raw reward of each
step's rollouts; the script prints one JSON object (every curve, the per-step mean and std over seeds) and appends a
table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

from benchmarks.ppo_throughput import (PRESETS, RESULTS, load_average, machine, ours_overrides, prompt_ids,
                                       run_ours_in_process, run_trl, versions)

TOY = replace(next(b for b in PRESETS["tiny"] if b.name == "tiny-gpt2-causal"), name="causal-toy", prompt_tokens=4)


def mean_std(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    steps = min(len(c) for c in curves)
    means = [statistics.fmean(c[i] for c in curves) for i in range(steps)]
    stds = [statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(steps)]
    return means, stds


def window(curve: list[float], k: int, last: bool) -> float:
    part = curve[-k:] if last else curve[:k]
    return statistics.fmean(part)


def run(seeds: list[int], steps: int, lr: float, threads: Optional[int], log) -> dict:
    import torch

    from benchmarks.assets import build_causal_toy

    paths = build_causal_toy()
    out: dict = {"settings": {"seeds": seeds, "steps": steps, "lr": lr, "batch_size": TOY.batch,
                              "mini_batch_size": TOY.mini_batch, "ppo_epochs": TOY.ppo_epochs,
                              "prompt_tokens": TOY.prompt_tokens, "new_tokens": TOY.new_tokens,
                              "lora": {"r": TOY.lora[0], "alpha": TOY.lora[1], "target_modules": list(TOY.lora[2])},
                              "kl_coef": 0.05, "threads": threads or torch.get_num_threads()},
                 "ours": {}, "trl": {}}
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="reward-curves-") as tmp:
        for seed in seeds:
            recipe, overrides = ours_overrides(TOY, paths, Path(tmp) / f"ours-{seed}", steps, threads, cuda)
            overrides += [f"run.seed={seed}", f"optim.lr={lr}"]
            log(f"seed {seed}: detoxrl, {steps} steps")
            ours = run_ours_in_process(recipe, overrides, 0, TOY.batch)
            out["ours"][str(seed)] = ours["reward_mean"]
            log(f"seed {seed}: TRL 1.12, {steps} steps")
            work = Path(tmp) / f"trl-{seed}"
            work.mkdir()
            trl = run_trl(TOY, paths, prompt_ids(recipe, overrides), steps, 0, threads, work, 1800, seed=seed, lr=lr,
                          log=log)
            if trl.get("status") != "ok":
                out["trl_error"] = trl.get("reason")
                log(f"TRL unavailable: {trl.get('reason')}")
                break
            out["trl"][str(seed)] = trl["reward_mean"]
            out.setdefault("trl_versions", trl.get("versions"))
    for system in ("ours", "trl"):
        curves = list(out[system].values())
        if curves:
            m, s = mean_std(curves)
            k = max(1, min(5, len(m) // 4))
            out[f"{system}_mean"], out[f"{system}_std"] = m, s
            out[f"{system}_first_last"] = [window(m, k, False), window(m, k, True)]
    return out


def markdown(result: dict, header: dict) -> str:
    st = result["settings"]
    lines = [f"### {header['date']} — reward curves, causal toy (detoxrl vs TRL 1.12)", "",
             f"- command: `{header['command']}`",
             f"- machine: {header['machine']['cpu']}, {header['machine']['cores']} cores; threads {st['threads']}; "
             f"load average at start {header['load_start']}, at end {header['load_end']}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if v) +
             (f"; TRL venv: " + ", ".join(f"{k} {v}" for k, v in result["trl_versions"].items())
              if result.get("trl_versions") else ""),
             f"- same tiny GPT-2 policy, same 1-logit GPT-2 sentiment reward (positive minus negative), same prompt "
             f"token ids; batch {st['batch_size']}, mini-batch {st['mini_batch_size']}, {st['ppo_epochs']} PPO "
             f"epochs, prompts {st['prompt_tokens']} + responses {st['new_tokens']} tokens, LoRA r={st['lora']['r']} "
             f"alpha={st['lora']['alpha']} on {','.join(st['lora']['target_modules'])}, lr {st['lr']}, fixed KL "
             f"coef {st['kl_coef']}; seeds {','.join(map(str, st['seeds']))}", ""]
    if "ours_mean" in result and "trl_mean" in result:
        fo, lo = result["ours_first_last"]
        ft, lt = result["trl_first_last"]
        lines += [f"Mean reward over seeds, first vs last steps: detoxrl {fo:+.2f} -> {lo:+.2f}; "
                  f"TRL {ft:+.2f} -> {lt:+.2f}", "",
                  "| step | detoxrl mean reward (± std over seeds) | TRL mean reward (± std over seeds) |",
                  "|---|---|---|"]
        for i, (mo, so, mt, s_t) in enumerate(zip(result["ours_mean"], result["ours_std"], result["trl_mean"],
                                                  result["trl_std"]), 1):
            lines.append(f"| {i} | {mo:+.2f} ± {so:.2f} | {mt:+.2f} ± {s_t:.2f} |")
    else:
        lines.append(f"TRL not measured: {(result.get('trl_error') or '')[:300]}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reward_curves", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    from benchmarks import json_only_stdout

    json_out = json_only_stdout()
    import torch
    import transformers

    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
              "command": "python -m benchmarks.reward_curves " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "load_start": load_average()}
    result = run([int(s) for s in args.seeds.split(",")], args.steps, args.lr, args.threads,
                 lambda m: print(f"[curves] {m}", file=sys.stderr, flush=True))
    header["load_end"] = load_average()
    result["load_average"] = [header["load_start"], header["load_end"]]
    print(json.dumps(result), file=json_out, flush=True)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n" + markdown(result, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
