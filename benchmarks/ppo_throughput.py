"""PPO throughput and memory: detoxrl against TRL 0.11.4 (the seeds' library, its notebook loop and its batched
generate), our own trainer run one prompt at a time (the seeds' loop shape) and TRL 1.12's PPO (causal).

    python -m benchmarks.ppo_throughput --preset NAME [--iterations N]
                                        [--baselines seeds,trl,trl011-loop,trl011-batched]
                                        [--warmup W] [--threads T] [--batch-size B] [--vocab small|real]
                                        [--set KEY=VALUE ...]
                                        [--results benchmarks/RESULTS.md | --no-append]

For every configuration of the preset it trains `W` warm-up PPO iterations and then `N` timed ones with detoxrl
(`train()`, the real loop), then the same with each requested baseline, and prints ONE JSON object per configuration
on stdout: samples/s, generated tokens/s, mean seconds per phase and each phase's share, peak memory (process RSS;
GPU max allocated), and for each baseline its own samples/s and our ratio to it. A Markdown table of the run, with
the command, machine, versions, load average and date, is appended to benchmarks/RESULTS.md.

Lengths are fixed so the systems do the same work: every prompt has exactly `prompt_tokens` tokens and every
response exactly `new_tokens` (min_new_tokens = max_new_tokens; TRL runs without a stop token).

Baselines
- seeds: the seeds' loop shape, measured in this same process right after ours: one prompt per `generate()` call
  and one text per classifier call (detoxrl with generation.rollout_batch_size=1 and reward batch size 1, so the
  models, maths and settings are otherwise identical; its old-log-prob pass also runs one row at a time).
- trl: `trl.experimental.ppo.PPOTrainer` (trl 1.12), causal configurations only (it is decoder-only), in its own
  virtualenv (benchmarks/trl_env.py), on the same model folders and the same prompt token ids
  (benchmarks/trl_baseline.py documents the settings mapping).
- trl011-loop / trl011-batched: TRL 0.11.4's `PPOTrainer.step()` with `AutoModelForSeq2SeqLMWithValueHead` (the
  seeds' own library), seq2seq configurations, in its own virtualenv (trl 0.11.4, transformers 4.46.3; the T5
  folder converted by `benchmarks.assets.transformers4_copy`), same prompt token ids, same lengths (min = max new
  tokens), the recipe's PPO settings (lr 1.41e-5, adaptive KL 0.2 -> 6, LoRA as `peft_config`).
  `loop`: the notebook's generation, one `generate` per prompt with its LengthSampler; `batched`: the whole batch
  in one `generate(queries, batch_size=B)` (benchmarks/trl011_baseline.py).

Presets (`--list` prints them): tiny (CPU/CI smoke), tiny-procs (CPU, 1 vs 2 processes), flan-t5-base (the detox
target: batch 64, 256-token prompts, 64 new tokens), gpt2 (gpt2-sized causal vs TRL), scaling (flan-t5-base at
batch 16/64/256), memory (flan-t5-large/xl/xxl with LoRA: plain bf16, 8-bit base weights, ZeRO-3 offload; GPU only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RECIPES = REPO / "configs" / "ppo"
PHASES = ("generate", "reward", "reference", "old_logprobs", "ppo_update")
TRL_KL_COEF = 0.05  # TRL has a fixed KL coefficient (its default); the causal configurations use it in both systems


# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bench:
    """One measured configuration."""
    name: str
    kind: str                       # seq2seq (the detox recipe) | causal (the IMDb recipe's shape)
    policy_size: str                # benchmarks.assets.T5_SIZES / GPT2_SIZES key
    reward_size: str
    batch: int
    mini_batch: int
    ppo_epochs: int
    prompt_tokens: int
    new_tokens: int
    lora: tuple = (32, 32, ("q", "v"))  # r, alpha, target modules
    real_vocab: bool = True         # the model's published vocabulary size (False: the ~1.5k trained tokenizer)
    processes: int = 1
    strategy: Optional[str] = None  # accelerate strategy of a launched run (ddp, zero3_offload); None: in process
    quantization: Optional[str] = None
    dtype: str = "float32"          # weights as saved (bfloat16 for the multi-billion memory-study models)
    gpu_only: bool = False
    memory_study: bool = False      # report status ok/oom + peak memory; run in a child process
    threads: Optional[int] = None   # CPU threads in all (split over processes); None: --threads
    baselines: tuple = ("seeds",)   # which baselines apply (trl: causal only; trl011-*: seq2seq)


T5_BASELINES = ("seeds", "trl011-loop", "trl011-batched")
BASELINES = ("seeds", "trl", "trl011-loop", "trl011-batched")
TRL011_SEEDS_KL = {"init_coef": 0.2, "adaptive": True, "target": 6.0, "horizon": 10000}  # the seeds' PPOConfig


def _detox(name: str, size: str = "base", batch: int = 64, **kw) -> Bench:
    kw.setdefault("baselines", T5_BASELINES)
    return Bench(name, "seq2seq", size, "base" if size != "tiny" else "tiny", batch, max(1, batch // 4), 1, 256, 64,
                 **kw)


PRESETS: dict[str, list[Bench]] = {
    "tiny": [
        Bench("tiny-t5-detox", "seq2seq", "tiny", "tiny", 16, 4, 1, 64, 16, (8, 8, ("q", "v")), real_vocab=False,
              baselines=T5_BASELINES),
        Bench("tiny-gpt2-causal", "causal", "tiny", "tiny", 16, 4, 4, 8, 16, (16, 32, ("c_attn",)),
              real_vocab=False, baselines=("seeds", "trl")),
    ],
    # the same global batch of 16 on one process (1 and 2 threads) and on two processes of 1 thread each (DDP, gloo)
    "tiny-procs": [
        Bench("tiny-t5-detox-1proc-1thread", "seq2seq", "tiny", "tiny", 16, 4, 1, 64, 16, (8, 8, ("q", "v")),
              real_vocab=False, baselines=(), threads=1),
        Bench("tiny-t5-detox-1proc-2threads", "seq2seq", "tiny", "tiny", 16, 4, 1, 64, 16, (8, 8, ("q", "v")),
              real_vocab=False, baselines=(), threads=2),
        Bench("tiny-t5-detox-2proc-1thread-each", "seq2seq", "tiny", "tiny", 16, 4, 1, 64, 16, (8, 8, ("q", "v")),
              real_vocab=False, processes=2, strategy="ddp", baselines=(), threads=2),
    ],
    "flan-t5-base": [_detox("flan-t5-base-detox")],
    "gpt2": [Bench("gpt2-causal", "causal", "small", "half", 64, 16, 4, 8, 16, (16, 32, ("c_attn",)),
                   baselines=("seeds", "trl"))],
    "scaling": [_detox(f"flan-t5-base-detox-b{b}", batch=b, baselines=()) for b in (16, 64, 256)],
    "memory": [
        _detox(f"flan-t5-{size}-{variant}", size, batch=16, dtype="bfloat16", gpu_only=True, memory_study=True,
               baselines=(), quantization="8bit" if variant == "8bit" else None,
               strategy="zero3_offload" if variant == "zero3-offload" else None)
        for size in ("large", "xl", "xxl") for variant in ("lora", "8bit", "zero3-offload")
    ],
}


def describe_presets() -> str:
    lines = []
    for name, benches in PRESETS.items():
        lines.append(f"{name}:")
        for b in benches:
            lines.append(f"  {b.name}: {b.kind} policy={b.policy_size} reward={b.reward_size} batch={b.batch} "
                         f"mini={b.mini_batch} epochs={b.ppo_epochs} prompt={b.prompt_tokens} new={b.new_tokens} "
                         f"processes={b.processes}{' strategy=' + b.strategy if b.strategy else ''}"
                         f"{' quantization=' + b.quantization if b.quantization else ''}"
                         f"{' (GPU only)' if b.gpu_only else ''} baselines={','.join(b.baselines) or '-'}")
    return "\n".join(lines)


def model_set(b: Bench, vocab: str):
    from benchmarks.assets import REAL_VOCAB, ModelSet

    real = b.real_vocab if vocab == "preset" else vocab == "real"
    family = "t5" if b.kind == "seq2seq" else "gpt2"
    return ModelSet(b.kind, b.policy_size, b.reward_size, REAL_VOCAB[family] if real else None,
                    prompt_chars=8 * b.prompt_tokens, rows=max(512, 2 * b.batch), dtype=b.dtype)


def ours_overrides(b: Bench, paths: dict[str, Path], out_dir: Path, steps: int, threads: Optional[int],
                   cuda: bool) -> tuple[Path, list[str]]:
    """(recipe, overrides) that make detoxrl train configuration `b` on the benchmark's local models."""
    r, alpha, targets = b.lora
    per_rank = b.batch // b.processes
    o = [f"run.output_dir={out_dir}", f"run.total_steps={steps}", "run.seed=0",
         f"run.device={'auto' if cuda else 'cpu'}", f"policy.model={paths['policy']}", "policy.adapter=null",
         f"policy.kind={b.kind}", f"policy.lora.r={r}", f"policy.lora.alpha={alpha}", "policy.lora.dropout=0.05",
         f"policy.lora.target_modules=[{','.join(targets)}]", f"reward.terms.0.model={paths['reward']}",
         "reward.terms.0.output=logit", f"reward.terms.0.batch_size={per_rank}", f"data.dataset={paths['data']}",
         "data.split=train", "data.min_text_chars=0", "data.reference_field=null", "data.max_samples=null",
         f"generation.min_new_tokens={b.new_tokens}", f"generation.max_new_tokens={b.new_tokens}",
         "generation.max_new_tokens_range=null", f"generation.rollout_batch_size={per_rank}", "generation.top_k=0",
         "generation.top_p=1.0", "generation.temperature=1.0", f"ppo.batch_size={per_rank}",
         f"ppo.mini_batch_size={max(1, b.mini_batch // b.processes)}", f"ppo.ppo_epochs={b.ppo_epochs}",
         "ppo.gradient_accumulation_steps=1", "logging.tensorboard=false", "logging.progress_bar=false",
         "logging.sample_every=0", "checkpoint.every_steps=0", "checkpoint.resume=never",
         "evaluation.before_after=false", "judges=[]"]  # judges grade runs; the benchmark times training only
    if threads and not cuda:
        o.append(f"run.cpu_threads={max(1, threads // b.processes)}")
    if b.quantization:
        o.append(f"policy.quantization={b.quantization}")
    if b.kind == "seq2seq":
        recipe = RECIPES / "flan_t5_base_dialogsum_detox.yaml"
        o += ["reward.terms.0.label=nothate", "reward.terms.0.score=response", "data.text_field=dialogue",
              f"data.max_prompt_tokens={b.prompt_tokens}", "data.prompt_tokens_range=null"]
    else:
        recipe = RECIPES / "gpt2_imdb_positive.yaml"
        # TRL's settings where they differ from the recipe: the score of prompt + response by a 1-logit classifier
        # on the policy tokenizer, a fixed KL coefficient, no gradient clipping
        o += ["reward.terms.0.label=LABEL_0", "reward.terms.0.score=prompt_response", "data.text_field=text",
              'data.template="{text}"', "data.max_prompt_tokens=512",
              f"data.prompt_tokens_range=[{b.prompt_tokens},{b.prompt_tokens}]", "ppo.kl.adaptive=false",
              f"ppo.kl.init_coef={TRL_KL_COEF}", "ppo.max_grad_norm=null", "optim.scheduler=constant"]
    return recipe, o


SEEDS_OVERRIDES = ["generation.rollout_batch_size=1", "reward.terms.0.batch_size=1"]


# --------------------------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading covers only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def wait_for_quiet(max_load: Optional[float], max_wait: float, log) -> Optional[list[float]]:
    """Wait (at most `max_wait` s) until the 1-minute load average is below `max_load`; the load when it starts.
    Timings on a machine shared with other work are distorted; RESULTS.md records the load next to each figure."""
    load = load_average()
    if max_load is None or load is None or load[0] < max_load:
        return load
    log(f"1-minute load {load[0]} >= {max_load}: waiting up to {max_wait:.0f} s for the machine to quieten")
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        time.sleep(15)
        load = load_average()
        if load[0] < max_load:
            return load
    log(f"load still {load[0]} after {max_wait:.0f} s: measuring anyway (recorded)")
    return load


def summarize_steps(metrics: list[dict], warmup: int, batch: int) -> dict[str, Any]:
    """Throughput and phase means over the steps after the warm-up ones."""
    timed = metrics[warmup:] or metrics[-1:]
    step_s = sum(m["time/step"] for m in timed) / len(timed)
    phases = {p: sum(m.get(f"time/{p}", 0.0) for m in timed) / len(timed) for p in PHASES}
    phases["other"] = max(0.0, step_s - sum(phases.values()))
    tokens = sum(m["perf/tokens_per_s"] * m["time/step"] for m in timed) / len(timed)
    share = {p: s / step_s for p, s in phases.items()} if step_s > 0 else {}
    return {"samples_per_s": batch / step_s, "tokens_per_s": tokens / step_s, "step_seconds": step_s,
            "phase_seconds": phases, "phase_share": share,
            "largest_phase": max(share, key=share.get) if share else None, "timed_steps": len(timed),
            "reward_mean": [m["env/reward_mean"] for m in metrics]}


def run_ours_in_process(recipe: Path, overrides: list[str], warmup: int, batch: int) -> dict[str, Any]:
    """Train with detoxrl in this process; throughput over the post-warm-up steps and this run's peak memory."""
    import torch

    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train

    cuda = torch.cuda.is_available()
    # each system compiles as if it ran alone: Dynamo's caches (per code object) would otherwise carry the batch-1
    # baseline's shapes into the next round's run and mark its dimensions dynamic
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_ok = reset_peak_rss()
    result = train(load_config(recipe, overrides))
    out = summarize_steps(result.metrics, warmup, batch)
    out["peak_memory"] = {"cpu_rss_mb": round(peak_rss_mb(), 1),
                          "cpu_rss_scope": "this run" if reset_ok else "process lifetime",
                          "gpu_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                          "gpu_max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None}
    del result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_worker(spec_path: Path) -> int:
    """`--worker SPEC`: one detoxrl run in a child process (launched runs, memory study); every rank writes
    rank-<i>.json beside the spec (rank 0 with the step metrics); an out-of-memory error is a result, not a crash."""
    import torch

    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train

    spec = json.loads(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {"rank": rank, "status": "ok"}
    try:
        result = train(load_config(spec["recipe"], spec["overrides"]))
        record["metrics"] = result.metrics if rank == 0 else []
    except torch.cuda.OutOfMemoryError as err:
        record.update(status="oom", error=str(err).splitlines()[0][:300])
    except Exception as err:  # recorded, and the harness reports it next to the configuration
        record.update(status="error", error=f"{type(err).__name__}: {str(err)[:500]}")
    record["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if cuda:
        record["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["gpu_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    (spec_path.parent / f"rank-{rank}.json").write_text(json.dumps(record))
    return 0


def run_ours_in_child(b: Bench, recipe: Path, overrides: list[str], warmup: int, threads: Optional[int],
                      workdir: Path, timeout: int) -> dict[str, Any]:
    """A launched run (`accelerate launch` for several processes or DeepSpeed) or an isolated one (memory study)."""
    spec = workdir / "worker.json"
    spec.write_text(json.dumps({"recipe": str(recipe), "overrides": overrides}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    if threads:
        env["OMP_NUM_THREADS"] = str(max(1, threads // b.processes))
    worker = ["-m", "benchmarks.ppo_throughput", "--worker", str(spec)]
    if b.strategy:
        import torch

        from detoxrl.launch.plan import build_command, make_plan

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        plan = make_plan(b.strategy, n_gpus, ["auto"], "shared", "auto", b.processes)
        cmd = build_command(plan, None, [])
        argv = cmd.argv[:cmd.argv.index("-m")] + worker
        accelerate = Path(sys.executable).parent / "accelerate"
        argv[0] = str(accelerate) if accelerate.exists() else argv[0]
        for k in cmd.unset:
            env.pop(k, None)
        env.update(cmd.env)
    else:
        argv = [sys.executable] + worker
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    ranks = sorted(workdir.glob("rank-*.json"))
    if not ranks:
        return {"status": "error", "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}",
                "wall_seconds": time.perf_counter() - t0}
    records = [json.loads(p.read_text()) for p in ranks]
    main = next(r for r in records if r["rank"] == 0)
    bad = [r for r in records if r["status"] != "ok"]
    out: dict[str, Any] = {"status": bad[0]["status"] if bad else "ok"}
    if bad:
        out["error"] = bad[0].get("error")
    if main.get("metrics"):
        out.update(summarize_steps(main["metrics"], warmup, b.batch))
    gpu = [r.get("gpu_max_allocated_mb") for r in records if r.get("gpu_max_allocated_mb") is not None]
    out["peak_memory"] = {"cpu_rss_mb": max(r["peak_rss_mb"] for r in records),
                          "cpu_rss_mb_all_ranks": sum(r["peak_rss_mb"] for r in records),
                          "cpu_rss_scope": f"child process{'es' if len(records) > 1 else ''} (max over ranks)",
                          "gpu_max_allocated_mb": max(gpu) if gpu else None,
                          "gpu_max_reserved_mb": max((r.get("gpu_max_reserved_mb") or 0 for r in records),
                                                     default=None) if gpu else None}
    return out


def prompt_ids(recipe: Path, overrides: list[str]) -> list[list[int]]:
    """The exact prompt token ids detoxrl trains on (handed to TRL so both systems see the same prompts)."""
    from detoxrl.train.config import load_config
    from detoxrl.train.data import build_prompts, load_rows
    from detoxrl.train.models import load_tokenizer

    cfg = load_config(recipe, overrides)
    tok = load_tokenizer(cfg.policy.model, cfg.policy.kind)
    return build_prompts(load_rows(cfg.data.dataset, cfg.data.split), cfg.data, tok, cfg.policy.kind,
                         cfg.run.seed).input_ids


def run_trl(b: Bench, paths: dict[str, Path], prompts: list[list[int]], steps: int, warmup: int,
            threads: Optional[int], workdir: Path, timeout: int, seed: int = 0, lr: float = 1.41e-5,
            log=print) -> dict[str, Any]:
    """Baseline B in its own virtualenv; samples/s over the post-warm-up steps, peak memory, its mean scores."""
    import torch

    from benchmarks.trl_env import TRLUnavailable, ensure_trl_venv

    try:
        python = ensure_trl_venv(log=log)
    except TRLUnavailable as err:
        return {"status": "unavailable", "reason": str(err)}
    cuda = torch.cuda.is_available()
    r, alpha, targets = b.lora
    spec = {"policy": str(paths["policy"]), "reward": str(paths["reward"]), "value_init": str(paths["reward"]),
            "prompts": prompts, "batch_size": b.batch, "mini_batch_size": b.mini_batch, "ppo_epochs": b.ppo_epochs,
            "response_length": b.new_tokens, "steps": steps,
            "lora": {"r": r, "alpha": alpha, "dropout": 0.05, "target_modules": list(targets)}, "lr": lr,
            "kl_coef": TRL_KL_COEF, "temperature": 1.0, "seed": seed,
            "threads": threads or torch.get_num_threads(), "device": "cuda" if cuda else "cpu",
            "dtype": "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32",
            "workdir": str(workdir / "trl-out")}
    spec_path, out_path = workdir / "trl-spec.json", workdir / "trl-result.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update({"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    script = Path(__file__).resolve().parent / "trl_baseline.py"
    try:
        proc = subprocess.run([str(python), str(script), str(spec_path), str(out_path)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out_path.is_file():
        return {"status": "error", "reason": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    res = json.loads(out_path.read_text())
    timed = res["step_seconds"][warmup:] or res["step_seconds"][-1:]
    step_s = sum(timed) / len(timed)
    gen = res["generate_seconds"][warmup:] or res["generate_seconds"][-1:]
    return {"status": "ok", "samples_per_s": b.batch / step_s, "tokens_per_s": b.batch * b.new_tokens / step_s,
            "step_seconds": step_s, "phase_seconds": {"generate": sum(gen) / len(gen),
                                                       "rest": step_s - sum(gen) / len(gen)},
            "peak_memory": {"cpu_rss_mb": round(res["peak_rss_mb"], 1), "cpu_rss_scope": "TRL child process",
                            "gpu_max_allocated_mb": res["gpu_max_allocated_mb"]},
            "reward_mean": res["scores"], "kl": res["kl"], "trainable_parameters": res["trainable_parameters"],
            "versions": res["versions"], "timed_steps": len(timed)}


def run_trl011(b: Bench, paths: dict[str, Path], prompts: list[list[int]], steps: int, warmup: int,
               threads: Optional[int], workdir: Path, timeout: int, mode: str, seed: int = 0, lr: float = 1.41e-5,
               log=print) -> dict[str, Any]:
    """TRL 0.11.4 (`mode`: the notebook's one-prompt loop, or batched generate) in its own virtualenv; samples/s over
    the post-warm-up steps, its generate phase, peak memory."""
    import torch

    from benchmarks.assets import transformers4_copy
    from benchmarks.trl_env import TRL_0_11, TRLUnavailable, ensure_trl_venv

    try:
        python = ensure_trl_venv(log=log, peer=TRL_0_11)
    except TRLUnavailable as err:
        return {"status": "unavailable", "reason": str(err)}
    r, alpha, targets = b.lora
    out_path = workdir / f"trl011-{mode}-result.json"
    spec = {"kind": b.kind, "policy": str(transformers4_copy(paths["policy"])), "reward": str(paths["reward"]),
            "reward_label": "nothate", "prompts": prompts, "steps": steps, "seed": seed, "lr": lr,
            "batch_size": b.batch, "mini_batch_size": b.mini_batch, "ppo_epochs": b.ppo_epochs, "kl": TRL011_SEEDS_KL,
            "lora": {"r": r, "alpha": alpha, "dropout": 0.05, "target_modules": list(targets)},
            "generation": {"min_new_tokens": b.new_tokens, "max_new_tokens": b.new_tokens, "top_k": 0, "top_p": 1.0,
                           "temperature": 1.0, "mode": mode},
            "threads": threads or torch.get_num_threads(), "out": str(out_path)}
    spec_path = workdir / f"trl011-{mode}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    script = Path(__file__).resolve().parent / "trl011_baseline.py"
    try:
        proc = subprocess.run([str(python), str(script), str(spec_path)], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out_path.is_file():
        return {"status": "error", "reason": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    res = json.loads(out_path.read_text())
    timed = res["steps"][warmup:] or res["steps"][-1:]
    step_s = sum(x["seconds"] for x in timed) / len(timed)
    gen_s = sum(x["generate_seconds"] for x in timed) / len(timed)
    return {"status": "ok", "mode": mode, "samples_per_s": b.batch / step_s,
            "tokens_per_s": b.batch * b.new_tokens / step_s, "step_seconds": step_s,
            "phase_seconds": {"generate": gen_s, "rest": step_s - gen_s},
            "peak_memory": {"cpu_rss_mb": round(res["peak_rss_mb"], 1), "cpu_rss_scope": "TRL 0.11.4 child process"},
            "trainable_parameters": res["trainable_parameters"], "versions": res["versions"],
            "timed_steps": len(timed)}


# --------------------------------------------------------------------------------------------------------------
# Machine description and results
# --------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "python": platform.python_version(),
           "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB) x{torch.cuda.device_count()}"
    return out


def versions() -> dict[str, Optional[str]]:
    from detoxrl.train.tracking import package_versions

    return package_versions()


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_section(records: list[dict], header: dict[str, Any]) -> str:
    """The Markdown appended to RESULTS.md for one harness run."""
    m = header["machine"]
    v = header["versions"]
    trl_v = next((r["baselines"]["trl"].get("versions") for r in records
                  if r.get("baselines", {}).get("trl", {}).get("status") == "ok"), None)
    trl011_v = next((r["baselines"][n].get("versions") for r in records for n in ("trl011-loop", "trl011-batched")
                     if r.get("baselines", {}).get(n, {}).get("status") == "ok"), None)
    lines = [f"### {header['date']} — preset `{header['preset']}`", "",
             f"- command: `{header['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
             f"Python {m['python']}",
             f"- threads: {header['threads']} (torch.set_num_threads / OMP_NUM_THREADS, same for every system); "
             f"load average (1/5/15 min) at start {header['load_start']}, at end {header['load_end']}",
             f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) +
             (f"; TRL venv: " + ", ".join(f"{k} {val}" for k, val in trl_v.items()) if trl_v else "") +
             (f"; TRL 0.11.4 venv: " + ", ".join(f"{k} {val}" for k, val in trl011_v.items()) if trl011_v else ""),
             f"- {header['warmup']} warm-up + {header['iterations']} timed PPO iterations per system; fixed lengths "
             f"(every prompt exactly its token count, min_new_tokens = max_new_tokens)", ""]
    lines += ["| config | device | batch | prompt+new tokens | samples/s | tokens/s | generate s | reward s | "
              "reference s | old logp s | update s | largest phase (share) | peak RSS MB | GPU peak MB | "
              "seeds' loop samples/s | ours/seeds | TRL samples/s | ours/TRL | TRL 0.11.4 loop samples/s | "
              "ours/loop | TRL 0.11.4 batched samples/s | ours/batched |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        procs = f" x{r['processes']} proc" if r.get("processes", 1) > 1 else ""
        procs += f", {r['threads']} thr" if r["device"] == "cpu" else ""
        lead = f"| {r['config']} | {r['device']}{procs} | {r['batch_size']} | {r['prompt_tokens']}+{r['new_tokens']} |"
        if r.get("status") not in (None, "ok"):
            why = (r.get("reason") or r.get("error") or "").splitlines()
            gpu = (r.get("peak_memory") or {}).get("gpu_max_allocated_mb")
            lines.append(f"{lead} {r['status']}{': ' + why[0][:120] if why else ''} |" + " - |" * 8
                         + f" {_fmt(gpu, 0)} |" + " - |" * 8)
            continue
        ph = r["phase_seconds"]
        share = r["phase_share"].get(r["largest_phase"], 0.0) if r.get("largest_phase") else 0.0
        bl = r.get("baselines", {})

        def base(name: str) -> tuple[str, str]:
            x = bl.get(name)
            if not x:
                return "-", "-"
            if x.get("status") != "ok":
                return x.get("status", "?"), "-"
            return _fmt(x["samples_per_s"]), f"{x['ratio']:.2f}x"

        s_sps, s_ratio = base("seeds")
        t_sps, t_ratio = base("trl")
        loop_sps, loop_ratio = base("trl011-loop")
        batched_sps, batched_ratio = base("trl011-batched")
        lines.append(
            f"{lead} {_fmt(r['samples_per_s'])} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(ph['generate'], 3)} | "
            f"{_fmt(ph['reward'], 3)} | {_fmt(ph['reference'], 3)} | {_fmt(ph['old_logprobs'], 3)} | "
            f"{_fmt(ph['ppo_update'], 3)} | {r['largest_phase']} ({share:.0%}) | "
            f"{_fmt(r['peak_memory']['cpu_rss_mb'], 0)} | {_fmt(r['peak_memory']['gpu_max_allocated_mb'], 0)} | "
            f"{s_sps} | {s_ratio} | {t_sps} | {t_ratio} | {loop_sps} | {loop_ratio} | {batched_sps} | "
            f"{batched_ratio} |")
    loads = []
    for r in records:
        parts = [f"ours {r['load_before'][0]}"] if r.get("load_before") else []
        parts += [f"{n} {x['load_before'][0]}" for n, x in r.get("baselines", {}).items() if x.get("load_before")]
        if parts:
            loads.append(f"`{r['config']}`: " + ", ".join(parts))
    if loads:
        lines += ["", "1-minute load average when each system started: " + "; ".join(loads) + "."]
    for r in records:
        for n, x in r.get("ratio_rounds", {}).items():
            ours = [q["samples_per_s"] for q in r["rounds"]]
            lines += ["", f"`{r['config']}` against {n}, {x['n']} paired rounds (the table shows the first): ratios "
                      + ", ".join(f"{v:.2f}x" for v in x["ratios"]) + f"; **median {x['median']:.2f}x** (range "
                      f"{x['min']:.2f}-{x['max']:.2f}x); ours {min(ours):.2f}-{max(ours):.2f} samples/s."]
    study = [r for r in records if r.get("memory_study")]
    if study and any(r.get("status") == "ok" for r in study):
        order = ["large", "xl", "xxl"]
        best = {}
        for r in study:
            variant = r["config"].split("-", 3)[-1]
            if r.get("status") == "ok" and order.index(r["policy_size"]) >= order.index(best.get(variant, "large")):
                best[variant] = r["policy_size"]
        lines += ["", "Largest flan-t5 size that trains with LoRA on this GPU: " +
                  ", ".join(f"{v}: flan-t5-{sz}" for v, sz in best.items()) + "."]
    notes = [f"- `{r['config']}` {n}: {(r['baselines'][n].get('reason') or '')[:300]}" for r in records
             for n in r.get("baselines", {}) if r["baselines"][n].get("status") not in ("ok", None)]
    if notes:
        lines += ["", "Baselines not measured:", *notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------------------
def measure(b: Bench, args, log) -> dict[str, Any]:
    """All systems on one configuration; the JSON record."""
    import torch

    from benchmarks.assets import build_model_set

    cuda = torch.cuda.is_available()
    if args.batch_size:
        b = replace(b, batch=args.batch_size, mini_batch=max(1, args.batch_size * b.mini_batch // b.batch))
    steps = args.warmup + args.iterations
    threads = b.threads or args.threads
    rec: dict[str, Any] = {
        "config": b.name, "preset": args.preset, "kind": b.kind, "policy_size": b.policy_size,
        "reward_size": b.reward_size, "device": "cuda" if cuda else "cpu", "processes": b.processes,
        "strategy": b.strategy, "quantization": b.quantization, "memory_study": b.memory_study, "threads": threads,
        "batch_size": b.batch, "mini_batch_size": b.mini_batch, "ppo_epochs": b.ppo_epochs,
        "prompt_tokens": b.prompt_tokens, "new_tokens": b.new_tokens,
        "lora": {"r": b.lora[0], "alpha": b.lora[1], "target_modules": list(b.lora[2])},
        "warmup": args.warmup, "iterations": args.iterations}
    wanted = [x for x in args.baselines if x in b.baselines]
    skipped = {x: {"status": "skipped", "reason": "TRL 1.12's PPO is decoder-only (it crashes on T5)" if x == "trl"
                   else "not part of this configuration"} for x in args.baselines if x not in b.baselines}
    if b.gpu_only and not cuda:
        rec.update(status="skipped", reason="needs a CUDA GPU (none visible): GPU figures pending",
                   baselines=skipped)
        return rec
    spec = model_set(b, args.vocab)
    rec["vocab"] = spec.vocab or "small (trained tokenizer)"
    log(f"[{b.name}] building/loading models ({spec.kind} {spec.policy_size}, vocab {rec['vocab']})")
    paths = build_model_set(spec)
    with tempfile.TemporaryDirectory(prefix=f"bench-{b.name}-") as tmp:
        tmp = Path(tmp)
        recipe, overrides = ours_overrides(b, paths, tmp / "ours", steps, threads, cuda)
        overrides += args.set  # e.g. generation.engine=static (ours and the batch-1 baseline)
        rec["recipe"] = str(recipe.relative_to(REPO))
        rec["overrides"] = [o for o in overrides if not o.startswith("run.output_dir=")]
        log(f"[{b.name}] detoxrl: {args.warmup} warm-up + {args.iterations} timed iterations")
        rec["load_before"] = wait_for_quiet(args.max_load, args.max_wait, log)
        if b.strategy or b.memory_study:
            (tmp / "ours").mkdir()
            ours = run_ours_in_child(b, recipe, overrides, args.warmup, threads, tmp / "ours", args.timeout)
        else:
            ours = run_ours_in_process(recipe, overrides, args.warmup, b.batch)
        rec.update(ours)
        rec.setdefault("status", "ok")
        baselines: dict[str, Any] = dict(skipped)
        if rec["status"] == "ok" and "seeds" in wanted:
            log(f"[{b.name}] baseline A (the seeds' loop: one prompt per generate, one text per reward call)")
            load = wait_for_quiet(args.max_load, args.max_wait, log)
            seeds = run_ours_in_process(recipe, [o.replace(f"run.output_dir={tmp / 'ours'}",
                                                           f"run.output_dir={tmp / 'seeds'}") for o in overrides]
                                        + SEEDS_OVERRIDES, args.warmup, b.batch)
            seeds.pop("reward_mean", None)
            baselines["seeds"] = {"status": "ok", **seeds, "ratio": rec["samples_per_s"] / seeds["samples_per_s"],
                                  "load_before": load}
        if rec["status"] == "ok" and "trl" in wanted:
            log(f"[{b.name}] baseline B (TRL 1.12 PPOTrainer, separate virtualenv)")
            load = wait_for_quiet(args.max_load, args.max_wait, log)
            trl = run_trl(b, paths, prompt_ids(recipe, overrides), steps, args.warmup, threads, tmp,
                          args.timeout, log=log)
            if trl.get("status") == "ok":
                trl["ratio"] = rec["samples_per_s"] / trl["samples_per_s"]
                trl.pop("reward_mean", None)
            baselines["trl"] = {**trl, "load_before": load}
        for mode in ("loop", "batched"):
            name = f"trl011-{mode}"
            if rec["status"] != "ok" or name not in wanted:
                continue
            log(f"[{b.name}] TRL 0.11.4 PPOTrainer, {mode} generation (separate virtualenv)")
            load = wait_for_quiet(args.max_load, args.max_wait, log)
            x = run_trl011(b, paths, prompt_ids(recipe, overrides), steps, args.warmup, threads, tmp, args.timeout,
                           mode, log=log)
            if x.get("status") == "ok":
                x["ratio"] = rec["samples_per_s"] / x["samples_per_s"]
            baselines[name] = {**x, "load_before": load}
        rec["baselines"] = baselines
    return rec


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ppo_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets:\n" + describe_presets())
    p.add_argument("--preset", choices=sorted(PRESETS), help="which configurations to measure")
    p.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per system (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="paired rounds per configuration (each: ours, then the "
                   "baselines); the table shows the first, the text below it every round's ratio, median and range")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per system (default 1)")
    p.add_argument("--baselines", default=",".join(BASELINES), help=f"comma list of {','.join(BASELINES)} ('' for "
                   "none; default all; each runs only where the configuration lists it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system (default: torch's "
                   "default); also OMP_NUM_THREADS of child processes")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch (mini-batch scales "
                   "with it); for CPU runs of GPU-sized presets")
    p.add_argument("--vocab", choices=("preset", "real", "small"), default="preset",
                   help="model vocabulary: the preset's choice, the published size, or the small trained tokenizer")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a detoxrl config override for our runs (repeatable), e.g. generation.engine=static")
    p.add_argument("--only", default=None, help="comma list of configuration names of the preset to run")
    p.add_argument("--max-load", type=float, default=None, help="before each system, wait until the 1-minute load "
                   "average is below this (shared machines); the load is recorded either way")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for --max-load (default 900)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed to each child process")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the table is appended to")
    p.add_argument("--no-append", action="store_true", help="print the JSON records only")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.list and not args.worker and not args.preset:
        p.error("--preset is required")
    args.baselines = [x for x in args.baselines.split(",") if x]
    unknown = set(args.baselines) - set(BASELINES)
    if unknown:
        p.error(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def with_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """`--repeats`: the first round's record, plus each round's throughput and every baseline's ratio per round
    (each round runs ours, then the baselines, back to back: paired rounds, so a drift in the machine's speed
    between rounds cancels in each ratio) with their median and range."""
    rec = dict(rounds[0])
    if len(rounds) == 1:
        return rec
    rec["rounds"] = [{"samples_per_s": r.get("samples_per_s"), "load_before": r.get("load_before"),
                      "baselines": {n: {"samples_per_s": x.get("samples_per_s"), "ratio": x.get("ratio")}
                                    for n, x in r.get("baselines", {}).items() if x.get("status") == "ok"}}
                     for r in rounds]
    names = [n for n in rec.get("baselines", {}) if all(n in r["baselines"] for r in rec["rounds"])]
    rec["ratio_rounds"] = {}
    for n in names:
        ratios = [r["baselines"][n]["ratio"] for r in rec["rounds"]]
        rec["ratio_rounds"][n] = {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
                                  "max": max(ratios), "n": len(ratios)}
    return rec


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    if args.list:
        print(describe_presets())
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # stdout carries the JSON records only: everything else that writes to it (DeepSpeed's import-time warning,
    # TRL's and transformers' prints) goes to stderr
    sys.stdout.flush()
    records_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch
    import transformers

    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or torch.get_num_threads()

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    benches = PRESETS[args.preset]
    if args.only:
        names = set(args.only.split(","))
        benches = [b for b in benches if b.name in names]
        if not benches:
            log(f"no configuration of {args.preset} is named {sorted(names)}")
            return 2
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "preset": args.preset,
              "command": "python -m benchmarks.ppo_throughput " + shlex.join(argv if argv is not None
                                                                             else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "threads": args.threads, "load_start": load_average(),
              "warmup": args.warmup, "iterations": args.iterations}
    records = []
    for b in benches:
        rec = with_rounds([measure(b, args, log) for _ in range(args.repeats)])
        rec.update(machine=header["machine"], versions=header["versions"], date=header["date"],
                   command=header["command"], load_average=load_average())
        records.append(rec)
        print(json.dumps(rec, default=str), file=records_out, flush=True)
    header["load_end"] = load_average()
    if not args.no_append:
        section = markdown_section(records, header)
        with open(args.results, "a") as f:
            f.write("\n" + section)
        log(f"appended the table to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
