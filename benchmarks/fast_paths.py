"""Issue 11's fast paths, each against the path it replaces, in one process on the same models:

    python -m benchmarks.fast_paths --preset tiny|flan-t5-base [--batch-size B] [--iterations N] [--threads T]
                                    [--engines hf,static,static-compiled] [--min-new 16 --max-new 128]
                                    [--mini-batch M --gas G]
                                    [--parts generate,update] [--results benchmarks/RESULTS.md | --no-append]

- generate: `rollout.generate_rollouts` (the trainer's rollout phase) with `generation.engine` hf, static (eager)
  and static with the decode step compiled (`generation.compile=always`); fixed lengths (min = max new tokens) on the
  preset's prompts. The compiled engine's first call (the compilation) is reported apart from its steady state.
- update: the PPO update (`update.ppo_update`) and the gradient-free reference and old-log-prob passes with and
  without `ppo.bucket_by_length`, on one step of responses whose lengths are drawn uniformly from
  --min-new..--max-new (the rollout's lengths vary with EOS; here they are drawn so both sides see the same rows),
  and the padded prompt + response slots each computes.

Prints one JSON object per part on stdout and appends a Markdown table to RESULTS.md (command, machine, versions,
load average). The models are benchmarks.ppo_throughput's: random weights, the real architectures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from benchmarks import ppo_throughput as pt

PRESETS = {"tiny": "tiny-t5-detox", "flan-t5-base": "flan-t5-base-detox", "gpt2": "gpt2-causal"}
ENGINES = {"hf": ("hf", "never"), "static": ("static", "never"), "static-compiled": ("static", "always")}


def _bench(args) -> pt.Bench:
    name = PRESETS[args.preset]
    b = next(x for bs in pt.PRESETS.values() for x in bs if x.name == name)
    if args.batch_size:
        b = replace(b, batch=args.batch_size, mini_batch=max(1, args.batch_size * b.mini_batch // b.batch))
    return b


def _setup(b: pt.Bench, args, tmp: Path):
    """The preset's policy (LoRA as the harness trains it), tokenizer and the exact prompt token ids."""
    import torch

    from benchmarks.assets import build_model_set
    from detoxrl.train.config import load_config
    from detoxrl.train.models import build_policy, load_tokenizer

    paths = build_model_set(pt.model_set(b, args.vocab))
    cuda = torch.cuda.is_available()
    recipe, overrides = pt.ours_overrides(b, paths, tmp, 1, args.threads, cuda)
    cfg = load_config(recipe, overrides)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    policy = build_policy(cfg.policy, cfg.policy.model, b.kind, device, dtype, True, 0)
    tok = load_tokenizer(cfg.policy.model, b.kind)
    prompts = pt.prompt_ids(recipe, overrides)[:b.batch]
    return cfg, policy, tok, prompts, device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_generate(b: pt.Bench, args, cfg, policy, tok, prompts, device, log) -> dict[str, Any]:
    """Each engine's first call (a compile, for the compiled one), then the timed calls interleaved round-robin
    (on a shared machine a load change then hits every engine alike)."""
    import torch

    from detoxrl.train.rollout import generate_rollouts, plan_engine

    gens = {name: replace(cfg.generation, engine=ENGINES[name][0], compile=ENGINES[name][1],
                          min_new_tokens=b.new_tokens, max_new_tokens=b.new_tokens, rollout_batch_size=b.batch)
            for name in args.engines}
    times: dict[str, list[float]] = {name: [] for name in gens}
    tokens: dict[str, int] = {}
    for i in range(args.iterations + 1):
        for name, gen in gens.items():
            torch.manual_seed(i)
            _sync(device)
            t0 = time.perf_counter()
            r = generate_rollouts(policy, prompts, tok, gen, b.new_tokens, device)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            tokens[name] = int(r.response_mask.sum())
    out: dict[str, Any] = {}
    for name, gen in gens.items():
        plan = plan_engine(policy.lm, gen, device, False)
        steady = sum(times[name][1:]) / args.iterations
        out[name] = {"engine": plan.engine, "compiled": plan.compile, "fallback": plan.fallback,
                     "first_call_s": times[name][0], "seconds": steady, "tokens_per_s": tokens[name] / steady}
        log(f"generate {name}: first {times[name][0]:.3f} s, then {steady:.3f} s per rollout of {b.batch}")
    base = out.get("hf", {}).get("seconds")
    for rec in out.values():
        rec["speedup_vs_hf"] = base / rec["seconds"] if base else None
    return out


def varied_rollout(b: pt.Bench, prompts, tok, device, lo: int, hi: int, seed: int = 0):
    """A rollout of the preset's prompts whose responses have lengths drawn from lo..hi (random token ids)."""
    import torch

    from detoxrl.train.rollout import Rollout, pad_prompts

    g = torch.Generator().manual_seed(seed)
    ids, mask = pad_prompts(prompts, tok.pad_token_id, b.kind == "causal", device)
    lengths = torch.randint(lo, hi + 1, (len(prompts),), generator=g)
    T = int(lengths.max())
    resp = torch.randint(5, len(tok) - 1, (len(prompts), T), generator=g)
    rmask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
    return Rollout(ids, mask, resp.to(device), rmask.to(device), torch.zeros(len(prompts), dtype=torch.bool))


def measure_update(b: pt.Bench, args, cfg, policy, tok, prompts, device, log) -> dict[str, Any]:
    """The reference, old-log-prob and update passes without and with buckets, interleaved (first round warms up)."""
    import torch
    from accelerate import Accelerator

    from detoxrl.train.buckets import padded_tokens
    from detoxrl.train.experience import Experience, forward_in_chunks, reference_in_chunks
    from detoxrl.train.update import micro_batches, ppo_update

    rollout = varied_rollout(b, prompts, tok, device, args.min_new, args.max_new)
    mask = rollout.response_mask.float()
    mini = args.mini_batch or b.mini_batch
    accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=args.gas)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(policy, optimizer)
    chunk = max(1, mini // args.gas)  # gradient-free passes in chunks of a micro-batch
    out: dict[str, Any] = {"lengths": [args.min_new, args.max_new], "response_tokens": int(mask.sum()),
                           "rows": len(prompts), "mini_batch": mini, "gas": args.gas, "chunk": chunk}
    recs = {key: {"reference_s": [], "old_logprobs_s": [], "update_s": []} for key in ("padded", "bucketed")}
    for i in range(args.iterations + 1):
        for key, rec in recs.items():
            bucket = key == "bucketed"
            ppo = replace(cfg.ppo, bucket_by_length=bucket, ppo_epochs=b.ppo_epochs, mini_batch_size=mini,
                          gradient_accumulation_steps=args.gas)
            _sync(device)
            t0 = time.perf_counter()
            ref = reference_in_chunks(policy, None, rollout, chunk, 1.0, forward=model, bucket=bucket)
            _sync(device)
            t1 = time.perf_counter()
            old, values = forward_in_chunks(model, rollout, chunk, 1.0, bucket=bucket)
            _sync(device)
            t2 = time.perf_counter()
            exp = Experience(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, mask, old, values,
                             torch.randn_like(old) * mask, torch.zeros_like(old), ref)
            ppo_update(accelerator, model, optimizer, scheduler, exp, ppo, 1.0, shuffle_seed=i)
            _sync(device)
            t3 = time.perf_counter()
            if i:
                rec["reference_s"].append(t1 - t0)
                rec["old_logprobs_s"].append(t2 - t1)
                rec["update_s"].append(t3 - t2)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
    mbs = [order[s:s + mini] for s in range(0, len(prompts), mini)]
    for key, rec in recs.items():
        bucket = key == "bucketed"
        slots = sum(padded_tokens(rollout.prompt_mask, rollout.response_mask,
                                  micro_batches(exp, mb, mini // args.gas, bucket), trim=bucket) for mb in mbs)
        out[key] = {k: sum(v) / len(v) for k, v in rec.items()}
        out[key]["update_slots_per_epoch"] = slots
        log(f"update {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[key].items()))
    out["speedup"] = {k: out["padded"][k] / out["bucketed"][k] for k in ("reference_s", "old_logprobs_s", "update_s")}
    return out


def markdown(b: pt.Bench, args, gen: Optional[dict], upd: Optional[dict], header: dict) -> str:
    m, v = header["machine"], header["versions"]
    lines = [f"### {header['date']} — fast paths (issue 11), preset `{args.preset}`", "",
             f"- command: `{header['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; threads {args.threads}; "
             f"load average at start {header['load_start']}, at end {header['load_end']} (a shared machine: the "
             f"ratios were measured seconds apart, absolute times are not comparable with other runs)",
             "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
             f"- batch {b.batch}, prompts {b.prompt_tokens} tokens, {args.iterations} timed + 1 warm-up per row", ""]
    if gen:
        lines += [f"Generation phase (`generate_rollouts`, {b.new_tokens} new tokens per response, fixed):", "",
                  "| engine | runs as | first call s | s per rollout | tokens/s | vs hf |", "|---|---|---|---|---|---|"]
        for name, r in gen.items():
            runs = r["engine"] + (" + compiled decode step" if r["compiled"] else "")
            lines.append(f"| {name} | {runs} | {r['first_call_s']:.3f} | {r['seconds']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x |")
        lines.append("")
    if upd:
        lines += [f"Update phase and gradient-free passes, responses of {upd['lengths'][0]}-{upd['lengths'][1]} "
                  f"tokens ({upd['response_tokens']} real tokens in {upd['rows']} rows), mini-batch "
                  f"{upd['mini_batch']} in {upd['gas']} micro-batch(es), gradient-free passes in chunks of "
                  f"{upd['chunk']}, {b.ppo_epochs} epoch(s):", "",
                  "| ppo.bucket_by_length | reference s | old log-probs s | update s | update slots (prompt + "
                  "response) per epoch |", "|---|---|---|---|---|"]
        for key in ("padded", "bucketed"):
            r = upd[key]
            lines.append(f"| {'true' if key == 'bucketed' else 'false'} | {r['reference_s']:.3f} | "
                         f"{r['old_logprobs_s']:.3f} | {r['update_s']:.3f} | {r['update_slots_per_epoch']} |")
        s = upd["speedup"]
        lines.append(f"| speed-up | {s['reference_s']:.2f}x | {s['old_logprobs_s']:.2f}x | {s['update_s']:.2f}x | "
                     f"{upd['padded']['update_slots_per_epoch'] / upd['bucketed']['update_slots_per_epoch']:.2f}x "
                     f"fewer |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_paths", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", choices=("preset", "real", "small"), default="preset")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--parts", default="generate,update")
    p.add_argument("--mini-batch", type=int, default=None, help="update mini-batch (default: the preset's)")
    p.add_argument("--gas", type=int, default=1, help="micro-batches per mini-batch in the update")
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--results", type=Path, default=pt.RESULTS)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    if set(args.engines) - set(ENGINES):
        p.error(f"--engines: choose from {', '.join(ENGINES)}")
    parts = set(args.parts.split(","))
    # stdout carries the JSON record only: what else writes to it (DeepSpeed's import-time warning) goes to stderr
    import os

    sys.stdout.flush()
    records_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch
    import transformers

    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[fast-paths] {msg}", file=sys.stderr, flush=True)

    b = _bench(args)
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": pt.machine(),
              "versions": pt.versions(), "load_start": pt.load_average(),
              "command": "python -m benchmarks.fast_paths " + shlex.join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="fast-paths-") as tmp:
        cfg, policy, tok, prompts, device = _setup(b, args, Path(tmp))
        gen = measure_generate(b, args, cfg, policy, tok, prompts, device, log) if "generate" in parts else None
        upd = measure_update(b, args, cfg, policy, tok, prompts, device, log) if "update" in parts else None
    header["load_end"] = pt.load_average()
    print(json.dumps({"preset": args.preset, "batch": b.batch, "generate": gen, "update": upd, **header},
                     default=str), file=records_out, flush=True)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n" + markdown(b, args, gen, upd, header))
        log(f"appended the table to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
