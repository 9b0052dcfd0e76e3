"""The learning benchmark: how far each trainer configuration, and each peer, moves two offline toys in 60 steps.

    python -m benchmarks.learning [--toy t5|gpt2] [--configs default,seeds,trl011-lr1e-3,...] [--seeds 0,1,2,3,4]
                                  [--steps 60] [--jobs 2] [--threads 1] [--results benchmarks/RESULTS.md | --no-append]
    python -m benchmarks.learning --list          # the named configurations

Toys (benchmarks/assets.py): `t5`, the offline demo's tiny T5 summariser (some of its summaries are rude) rewarded
by the `nothate` logit of a tiny RoBERTa classifier with its OWN tokenizer; `gpt2`, a tiny GPT-2 fine-tuned to
continue the same dialogues with a summary, same reward. Every system samples 16 responses per step (3-24 new
tokens, top_k 0, top_p 1, temperature 1) from prompts of at most 128 tokens, with a LoRA r=32 alpha=32 on q,v
(c_attn for GPT-2), dropout 0.

Configurations: detoxrl with a named set of trainer overrides (`--list`), or a peer, each in its own virtualenv
built by the harness (benchmarks/trl_env.py): `trl011-lr<LR>` (TRL 0.11.4, the seeds' library: the old `step()`
API, LoRA via peft_config, adaptive KL 0.2 -> 6, the seeds' ppo_epochs 1, mini-batch 4; both toys;
`trl011-nodrop-lr<LR>`: the same with the model's dropout set to 0, as detoxrl runs it) and
`trl112-lr<LR>` (TRL 1.12's `trl.experimental.ppo`, GPT-2 toy only).

Every run is a child process with one torch thread (`--jobs` at a time) and records, per step, its responses and
the KL to the start as the system itself logs it (k1: sum over response tokens of log pi - log pi_ref, nats per
response). The harness then re-scores every response with the toy's classifier in this process, so all systems
are measured by the same code: reward (the `nothate` logit), toxic share (P(hate) > 0.5), distinct-2 (word
bigrams, per step). Start = the untrained policy: step 1 of every run in the invocation pooled (all systems load
the same weights; one run's 16 first responses are too few), except distinct-2, a statistic of the batch that
depends on its grouping, taken from each run's own step 1; per run, end = the mean of the last 5 steps;
reward gain = end - start, gain per step = gain / steps; distinct-2 relative = end / start. Over seeds: mean and
95% t-interval. One JSON line per configuration on stdout; a Markdown table appended to RESULTS.md.

Raw runs are kept under $DETOXRL_CACHE/bench/learning-runs, keyed by the resolved settings (for detoxrl the whole
resolved trainer config and the trainer's source, so a changed default or trainer is a new run), and reused by
later invocations (`--runs DIR` elsewhere, `--fresh` to rerun).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.ppo_throughput import REPO, RESULTS, load_average, machine, prompt_ids, versions

LAST = 5  # steps averaged for the end-of-run figures
TARGETS = {"toxic_end": 0.30, "kl_end": 3.0, "distinct2_rel": 0.5}  # issue 9, "Done means"


# --------------------------------------------------------------------------------------------------------------
# Toys and configurations
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Toy:
    name: str
    kind: str                 # seq2seq | causal
    template: str
    lora_targets: tuple[str, ...]
    peers: tuple[str, ...]    # which peer families run on it
    reward_label: str = "nothate"
    toxic_label: str = "hate"
    batch: int = 16
    mini_batch: int = 4
    min_new: int = 3
    max_new: int = 24
    max_prompt_tokens: int = 128

    def paths(self) -> dict[str, Path]:
        from benchmarks.assets import build_causal_dialogue_toy, build_t5_detox_toy

        return build_t5_detox_toy() if self.kind == "seq2seq" else build_causal_dialogue_toy()


def _toys() -> dict[str, Toy]:
    from benchmarks.assets import CAUSAL_DIALOGUE_TEMPLATE
    from detoxrl.train.shipped_data import PROMPT_TEMPLATE

    return {"t5": Toy("t5", "seq2seq", PROMPT_TEMPLATE, ("q", "v"), ("trl011",)),
            "gpt2": Toy("gpt2", "causal", CAUSAL_DIALOGUE_TEMPLATE, ("c_attn",), ("trl011", "trl112"))}


# name -> (what it is, trainer overrides on top of the toy's settings). Defaults are the trainer's dataclass
# defaults, so `default` follows whatever the trainer ships.
# The settings the rows of RESULTS.md were measured with, written out, so that a changed trainer default does not
# change what an older name means. TUNED = today's defaults (lr 3e-4, 2 epochs, KL 0.2 -> 3, vf_coef 0.1, detached
# critic); OLD = the defaults before issue 9 (lr 1.41e-5, 4 epochs, KL target 6, shared critic).
TUNED = ["optim.lr=3e-4", "ppo.ppo_epochs=2", "ppo.kl.init_coef=0.2", "ppo.kl.target=3.0", "ppo.kl.horizon=10000",
         "ppo.vf_coef=0.1"]
OLD = ["optim.lr=1.41e-5", "ppo.ppo_epochs=4", "ppo.kl.target=6.0", "critic.mode=shared"]
K4 = ["ppo.k=4"]

# name -> (what it is, trainer overrides on top of the toy's settings). `default` has none: it follows whatever
# the trainer ships.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "default": ("the trainer's defaults (no overrides)", []),
    "old-default": ("the defaults before issue 9: lr 1.41e-5, 4 epochs, KL 0.2 -> 6, shared critic", OLD),
    "seeds": ("the seeds' PPO hyperparameters: lr 1.41e-5, 1 PPO epoch, adaptive KL 0.2 -> 6 (horizon 10000)",
              ["optim.lr=1.41e-5", "ppo.ppo_epochs=1", "ppo.kl.init_coef=0.2", "ppo.kl.adaptive=true",
               "ppo.kl.target=6.0", "ppo.kl.horizon=10000", "critic.mode=shared"]),
    "demo": ("the demo recipe's settings before issue 9: lr 1e-3, 2 epochs, KL 0.2->3, vf_coef 0.1",
             TUNED[1:] + ["optim.lr=1e-3", "critic.mode=shared"]),
    "demo-lr3e-4": ("lr 3e-4, 2 epochs, KL 0.2 -> 3, vf_coef 0.1 (gae, shared critic)", TUNED + ["critic.mode=shared"]),
    "demo-lr3e-4-detached": ("demo-lr3e-4 with the value head on detached hidden states (= today's defaults)",
                             TUNED + ["critic.mode=detached"]),
    "demo-lr3e-4-adapter": ("demo-lr3e-4 with a separate critic LoRA adapter on the same base",
                            TUNED + ["critic.mode=adapter"]),
    "demo-lr3e-4-rloo-k4": ("demo-lr3e-4 with RLOO, 4 responses per prompt (no critic)",
                            TUNED + ["ppo.estimator=rloo"] + K4),
    "demo-lr3e-4-grpo-k4": ("demo-lr3e-4 with GRPO advantages (group mean/std), 4 per prompt",
                            TUNED + ["ppo.estimator=grpo"] + K4),
    "demo-lr3e-4-dr_grpo-k4": ("demo-lr3e-4 with Dr. GRPO (no std scaling, token sum / constant), 4 per prompt",
                               TUNED + ["ppo.estimator=grpo", "ppo.group_std_scale=false",
                                        "ppo.loss_aggregation=token_sum_norm"] + K4),
    "demo-lr3e-4-reinforce_pp-k4": ("demo-lr3e-4 with REINFORCE++ (global-batch normalised), 4 per prompt",
                                    TUNED + ["ppo.estimator=reinforce_pp"] + K4),
    "default-std-scaling": ("defaults + reward divided by its running std (mean not shifted)",
                            ["reward.normalize=true", "reward.normalize_shift_mean=false"]),
    "default-standardise": ("defaults + reward standardised (running mean and std)", ["reward.normalize=true"]),
    "default-relative-clip": ("defaults + value clip relative to the returns' std", ["critic.value_clip=relative"]),
    "default-no-clip": ("defaults without value clipping", ["critic.value_clip=none"]),
    "default-warmup4": ("defaults + 4 critic warm-up steps", ["critic.warmup_steps=4"]),
    "default-critic-lam1": ("defaults + critic lambda 1 (policy lambda 0.95)", ["critic.lam=1.0"]),
    "default-horizon200": ("defaults + KL controller horizon 200 (beta adapts within the run)",
                           ["ppo.kl.horizon=200"]),
    "seeds-lr1e-3": ("the seeds' settings at lr 1e-3", OLD[1:] + ["optim.lr=1e-3", "ppo.ppo_epochs=1"]),
    "lr1e-3": ("the old defaults at lr 1e-3 (gae, shared critic)", OLD[1:] + ["optim.lr=1e-3"]),
    "lr3e-3": ("the old defaults at lr 3e-3", OLD[1:] + ["optim.lr=3e-3"]),
    "detached-lr1e-3": ("old defaults, detached critic, lr 1e-3", OLD[1:3] + ["optim.lr=1e-3", "critic.mode=detached"]),
    "adapter-lr1e-3": ("old defaults, a separate critic LoRA adapter, lr 1e-3",
                       OLD[1:3] + ["optim.lr=1e-3", "critic.mode=adapter"]),
    "rloo-k4-lr1e-3": ("RLOO, 4 per prompt, old defaults at lr 1e-3", OLD[1:] + ["optim.lr=1e-3", "ppo.estimator=rloo"] + K4),
    "grpo-k4-lr1e-3": ("GRPO, 4 per prompt, old defaults at lr 1e-3", OLD[1:] + ["optim.lr=1e-3", "ppo.estimator=grpo"] + K4),
}
PEER_NAME = re.compile(r"^(trl011|trl112)(-nodrop)?-lr([0-9.eE+-]+)$")


@dataclass(frozen=True)
class Configuration:
    name: str
    system: str               # detoxrl | trl011 | trl112
    overrides: tuple[str, ...] = ()
    lr: Optional[float] = None
    about: str = ""
    dropout_off: bool = False  # peers: the model's dropout set to 0 (detoxrl never applies it)


def resolve_configuration(name: str, custom: dict[str, list[str]]) -> Configuration:
    if name in custom:
        return Configuration(name, "detoxrl", tuple(custom[name]), about="custom: " + " ".join(custom[name]))
    if name in CONFIGS:
        about, overrides = CONFIGS[name]
        return Configuration(name, "detoxrl", tuple(overrides), about=about)
    m = PEER_NAME.match(name)
    if m:
        label = {"trl011": "TRL 0.11.4", "trl112": "TRL 1.12"}[m.group(1)]
        return Configuration(name, m.group(1), lr=float(m.group(3)), dropout_off=bool(m.group(2)),
                             about=f"{label} PPO, lr {m.group(3)}" + (", model dropout 0" if m.group(2) else ""))
    raise SystemExit(f"unknown configuration {name!r}: choose from {', '.join(CONFIGS)}, trl011[-nodrop]-lr<LR>, "
                     f"trl112-lr<LR>, or define it with --custom '{name}=key=value key=value'")


def toy_overrides(toy: Toy, paths: dict[str, Path], out_dir: Path, steps: int, seed: int) -> list[str]:
    """What every detoxrl run on the toy shares (the configuration's overrides go after these)."""
    return [f"run.output_dir={out_dir}", f"run.total_steps={steps}", f"run.seed={seed}", "run.device=cpu",
            "run.cpu_threads=1", f"policy.model={paths['policy']}", "policy.adapter=null", f"policy.kind={toy.kind}",
            "policy.lora.r=32", "policy.lora.alpha=32", "policy.lora.dropout=0.0",
            f"policy.lora.target_modules=[{','.join(toy.lora_targets)}]", f"reward.terms.0.model={paths['reward']}",
            f"reward.terms.0.label={toy.reward_label}", "reward.terms.0.output=logit", "reward.terms.0.batch_size=64",
            "reward.terms.0.score=response", f"data.dataset={paths['data']}", "data.split=train",
            "data.text_field=dialogue", f"data.template={json.dumps(toy.template)}",
            f"data.max_prompt_tokens={toy.max_prompt_tokens}", "data.reference_field=null",
            "generation.top_k=0", "generation.top_p=1.0", "generation.temperature=1.0",
            f"generation.min_new_tokens={toy.min_new}", f"generation.max_new_tokens={toy.max_new}",
            f"generation.rollout_batch_size={toy.batch}", f"ppo.batch_size={toy.batch}",
            f"ppo.mini_batch_size={toy.mini_batch}", "logging.tensorboard=false", "logging.progress_bar=false",
            "logging.sample_every=0", "checkpoint.every_steps=0", "checkpoint.resume=never",
            "evaluation.before_after=false"]


# --------------------------------------------------------------------------------------------------------------
# One run (a child process)
# --------------------------------------------------------------------------------------------------------------
def run_detoxrl_worker(spec_path: Path) -> int:
    """`--worker SPEC`: one detoxrl training run; records each step's decoded responses and its logged KL."""
    import detoxrl.train.experience as experience
    import detoxrl.train.loop as loop
    from detoxrl.train.config import load_config

    spec = json.loads(spec_path.read_text())
    recorded: list[list[str]] = []
    decode = experience.decode_responses

    def recording_decode(tokenizer, rollout):  # each step's responses are decoded exactly once (sample_responses)
        texts = decode(tokenizer, rollout)
        recorded.append(texts)
        return texts

    experience.decode_responses = recording_decode
    result = loop.train(load_config(None, spec["overrides"]))
    if len(recorded) != len(result.metrics):
        raise RuntimeError(f"recorded {len(recorded)} response batches for {len(result.metrics)} steps")
    steps = [{"responses": texts, "kl": m["objective/kl"], "kl_coef": m["objective/kl_coef"],
              "logged_reward": m["env/reward_mean"], "seconds": m["time/step"]}
             for texts, m in zip(recorded, result.metrics)]
    Path(spec["out"]).write_text(json.dumps({"steps": steps}))
    return 0


def peer_spec(cfg: Configuration, toy: Toy, paths: dict[str, Path], prompts: list[list[int]], steps: int,
              seed: int) -> dict[str, Any]:
    """What a peer's script reads: the same models, prompt token ids and sampling settings as detoxrl's runs."""
    from benchmarks.assets import transformers4_copy

    if cfg.system == "trl112":  # benchmarks/trl_baseline.py's spec; its KL coefficient is fixed (0.2: ours start)
        return {"policy": str(paths["policy"]), "reward": str(paths["reward"]), "value_init": str(paths["policy"]),
                "reward_label": toy.reward_label, "stop_token": "eos", "prompts": prompts, "batch_size": toy.batch,
                "mini_batch_size": toy.mini_batch, "ppo_epochs": 4, "response_length": toy.max_new, "steps": steps,
                "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": list(toy.lora_targets)},
                "lr": cfg.lr, "kl_coef": 0.2, "temperature": 1.0, "seed": seed, "threads": 1, "device": "cpu",
                "dtype": "float32"}  # execute() adds the workdir (not part of the cache key)
    policy = transformers4_copy(paths["policy"], cfg.dropout_off) if cfg.system == "trl011" else paths["policy"]
    return {"kind": toy.kind, "policy": str(policy), "reward": str(paths["reward"]),
            "reward_label": toy.reward_label, "prompts": prompts, "steps": steps, "seed": seed, "lr": cfg.lr,
            "batch_size": toy.batch, "mini_batch_size": toy.mini_batch, "ppo_epochs": 1,
            "kl": {"init_coef": 0.2, "adaptive": True, "target": 6.0, "horizon": 10000},
            "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": list(toy.lora_targets)},
            "generation": {"min_new_tokens": toy.min_new, "max_new_tokens": toy.max_new, "top_k": 0, "top_p": 1.0,
                           "temperature": 1.0}, "threads": 1}


def run_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_hash(files: list[Path]) -> str:
    """Content hash of the code a run executes: a cached run is reused only for the same trainer / peer script."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "VIRTUAL_ENV"))}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONNOUSERSITE": "1"})
    return env


def execute(job: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run one job's child process; its raw record (steps, process wall seconds) or an error."""
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    out = work / "steps.json"
    spec = {**job["spec"], "out": str(out)}
    if job["system"] == "trl112":
        spec["workdir"] = str(work / "trl-out")
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    if job["system"] == "detoxrl":
        env = _child_env()
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "benchmarks.learning", "--worker", str(spec_path)]
    else:
        env = {k: v for k, v in _child_env().items() if k != "PYTHONPATH"}
        argv = [job["python"], str(Path(__file__).parent / job["script"]), str(spec_path)]
        if job["system"] == "trl112":  # the throughput benchmark's script: SPEC OUT
            argv.append(str(out))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        return {"status": "error", "reason": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    return {"status": "ok", "process_seconds": wall, **json.loads(out.read_text())}


# --------------------------------------------------------------------------------------------------------------
# Measures (the same code for every system)
# --------------------------------------------------------------------------------------------------------------
class Scorer:
    """The toy's classifier, loaded once: the reward label's logit and P(toxic) of each response."""

    def __init__(self, reward_path: Path, reward_label: str, toxic_label: str) -> None:
        import torch

        from detoxrl.train.config import RewardTermConfig
        from detoxrl.train.reward import RewardTerm, resolve_label

        cfg = RewardTermConfig(model=str(reward_path), label=reward_label, output="logit", batch_size=64,
                               score="response")
        self.term = RewardTerm(cfg, str(reward_path), torch.device("cpu"), torch.float32)
        self.reward_index = self.term.label_index
        self.toxic_index = resolve_label(self.term.model.config.id2label, toxic_label, str(reward_path))

    def __call__(self, responses: list[str]) -> tuple[list[float], list[float]]:
        logits = self.term.logits([""] * len(responses), responses, with_prompt=False)
        return logits[:, self.reward_index].tolist(), logits.softmax(-1)[:, self.toxic_index].tolist()


def per_step(steps: list[dict[str, Any]], scorer: Callable) -> list[dict[str, float]]:
    from detoxrl.train.tracking import distinct_n

    out = []
    for s in steps:
        reward, p_toxic = scorer(s["responses"])
        out.append({"reward": sum(reward) / len(reward), "toxic_share": sum(p > 0.5 for p in p_toxic) / len(p_toxic),
                    "distinct2": distinct_n(s["responses"], 2) or 0.0, "kl": float(s["kl"]),
                    "responses": len(s["responses"]), "seconds": float(s["seconds"])})
    return out


def pooled_start(curves: list[list[dict[str, float]]]) -> dict[str, float]:
    """The untrained policy's figures: step 1 of every run pooled (all systems start from the same weights, and 16
    responses of one run's first step are too few to be a baseline: a toxic share of 16 has a std of ~0.12)."""
    firsts = [c[0] for c in curves]
    return {k: sum(f[k] for f in firsts) / len(firsts) for k in ("reward", "toxic_share", "distinct2")}


def run_summary(curve: list[dict[str, float]], start: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Start (`start`, else this run's step 1) vs end (mean of the last LAST steps, fewer in a short smoke run)."""
    first, last = start or curve[0], curve[-min(LAST, len(curve) - 1):]

    def end(key: str) -> float:
        return sum(c[key] for c in last) / len(last)

    steps = len(curve)
    return {"reward_step1": curve[0]["reward"], "toxic_step1": curve[0]["toxic_share"],
            "reward_start": first["reward"], "reward_end": end("reward"),
            "reward_gain": end("reward") - first["reward"], "gain_per_step": (end("reward") - first["reward"]) / steps,
            "toxic_start": first["toxic_share"], "toxic_end": end("toxic_share"), "kl_end": end("kl"),
            # distinct-2 is a statistic of the step's batch, which depends on its grouping (k responses to one
            # prompt share bigrams), so it is compared with the run's own first step, not the pooled start
            "kl_max": max(c["kl"] for c in curve), "distinct2_start": curve[0]["distinct2"],
            "distinct2_rel": end("distinct2") / curve[0]["distinct2"] if curve[0]["distinct2"] else float("nan"),
            "responses": sum(c["responses"] for c in curve), "wall_s": sum(c["seconds"] for c in curve)}


_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:  # the two-sided 95% table (df 1..30), then the normal value
        return _T95[df - 1] if df <= len(_T95) else 1.960


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% t-interval of the mean over seeds (a point when there is one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    half = t_quantile_975(len(vals) - 1) * sd / math.sqrt(len(vals))
    return m, m - half, m + half


def aggregate(summaries: list[dict[str, float]]) -> dict[str, list[float]]:
    return {k: list(mean_interval([s[k] for s in summaries])) for k in summaries[0]} if summaries else {}


def meets_targets(agg: dict[str, list[float]]) -> dict[str, bool]:
    return {"toxic_end": agg["toxic_end"][0] <= TARGETS["toxic_end"], "kl_end": agg["kl_end"][0] <= TARGETS["kl_end"],
            "distinct2_rel": agg["distinct2_rel"][0] >= TARGETS["distinct2_rel"]}


# --------------------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------------------
PEER_SCRIPTS = {"trl011": "trl011_baseline.py", "trl112": "trl_baseline.py"}


def peer_python(system: str, log) -> str:
    from benchmarks.trl_env import TRL_0_11, TRL_1_12, ensure_trl_venv

    return str(ensure_trl_venv(log=log, peer=TRL_0_11 if system == "trl011" else TRL_1_12))


def plan_jobs(toy: Toy, configs: list[Configuration], seeds: list[int], steps: int, tmp: Path, log) -> list[dict]:
    """One job per (configuration, seed), each with the key its raw record is cached under."""
    from detoxrl.train.config import load_config, to_dict

    paths = toy.paths()
    jobs, prompts, pythons = [], None, {}
    for cfg in configs:
        if cfg.system != "detoxrl" and cfg.system not in toy.peers:
            log(f"{cfg.name}: not run on the {toy.name} toy (TRL 1.12's PPO is decoder-only)")
            continue
        for seed in seeds:
            work = tmp / f"{cfg.name}-{seed}"
            if cfg.system == "detoxrl":
                overrides = toy_overrides(toy, paths, work / "run", steps, seed) + list(cfg.overrides)
                resolved = to_dict(load_config(None, overrides))  # an override typo fails here, before any run
                resolved["run"].pop("output_dir")
                key = run_key({"system": "detoxrl", "config": resolved, "toy": toy.name,
                               "code": source_hash(list((REPO / "train").glob("*.py")))})
                jobs.append({"config": cfg.name, "seed": seed, "system": "detoxrl", "key": key, "work": str(work),
                             "spec": {"overrides": overrides}})
            else:
                if prompts is None:
                    prompts = prompt_ids(None, toy_overrides(toy, paths, work, steps, 0))
                spec = peer_spec(cfg, toy, paths, prompts, steps, seed)
                key = run_key({"system": cfg.system, "spec": spec, "toy": toy.name,
                               "code": source_hash([Path(__file__).parent / PEER_SCRIPTS[cfg.system]])})
                if cfg.system not in pythons:
                    pythons[cfg.system] = peer_python(cfg.system, log)
                jobs.append({"config": cfg.name, "seed": seed, "system": cfg.system, "key": key, "work": str(work),
                             "spec": spec, "python": pythons[cfg.system], "script": PEER_SCRIPTS[cfg.system]})
    return jobs


def run_jobs(jobs: list[dict], root: Path, n_jobs: int, fresh: bool, timeout: int, log,
             cached_only: bool = False) -> dict[tuple[str, int], dict]:
    """Each job's raw record, from the cache `root` or by running it (at most n_jobs child processes at once)."""
    root.mkdir(parents=True, exist_ok=True)
    done, todo = {}, []
    for job in jobs:
        cached = root / f"{job['key']}.json"
        if cached.is_file() and not fresh:
            done[(job["config"], job["seed"])] = json.loads(cached.read_text())
        else:
            todo.append(job)
    log(f"{len(jobs) - len(todo)} run(s) cached, {len(todo)} to run, {n_jobs} at a time")
    if cached_only:
        log(f"--cached-only: reporting the cached runs, {len(todo)} not run")
        return done

    def one(job: dict) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        rec = execute(job, timeout)
        log(f"{job['config']} seed {job['seed']}: {rec['status']} in {time.perf_counter() - t0:.0f} s"
            + (f" ({rec['reason'][-300:]})" if rec["status"] != "ok" else ""))
        return job, rec

    with cf.ThreadPoolExecutor(max_workers=n_jobs) as pool:
        for job, rec in pool.map(one, todo):
            if rec["status"] == "ok":
                rec["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
                rec["job"] = {k: job[k] for k in ("config", "seed", "system", "key")}
                (root / f"{job['key']}.json").write_text(json.dumps(rec))
            done[(job["config"], job["seed"])] = rec
    return done


def measure_toy(toy: Toy, configs: list[Configuration], seeds: list[int], steps: int, args, log) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="learning-") as tmp:
        jobs = plan_jobs(toy, configs, seeds, steps, Path(tmp), log)
        raw = run_jobs(jobs, args.runs, args.jobs, args.fresh, args.timeout, log, args.cached_only)
    scorer = Scorer(toy.paths()["reward"], toy.reward_label, toy.toxic_label)
    curves_of = {k: per_step(r["steps"], scorer) for k, r in raw.items() if r["status"] == "ok"}
    start = pooled_start(list(curves_of.values())) if curves_of else None
    records = []
    for cfg in configs:
        runs = {seed: raw[(cfg.name, seed)] for seed in seeds if (cfg.name, seed) in raw}
        if not runs:
            continue
        rec: dict[str, Any] = {"toy": toy.name, "config": cfg.name, "system": cfg.system, "about": cfg.about,
                               "overrides": list(cfg.overrides), "lr": cfg.lr, "steps": steps, "seeds": seeds}
        errors = {s: r["reason"] for s, r in runs.items() if r["status"] != "ok"}
        ok = {s: r for s, r in runs.items() if r["status"] == "ok"}
        curves = {s: curves_of[(cfg.name, s)] for s in ok}
        rec["start"] = {**start, "runs_pooled": len(curves_of)}
        rec["per_seed"] = {str(s): run_summary(c, start) for s, c in curves.items()}
        rec["summary"] = aggregate(list(rec["per_seed"].values()))
        rec["meets_targets"] = meets_targets(rec["summary"]) if rec["summary"] else None
        rec["curves"] = {str(s): [{k: round(v, 4) for k, v in step.items()} for step in c] for s, c in curves.items()}
        rec["peer_versions"] = next((r.get("versions") for r in ok.values() if r.get("versions")), None)
        rec["status"] = "ok" if ok and not errors else ("partial" if ok else "error")
        if errors:
            rec["errors"] = {str(s): e[-800:] for s, e in errors.items()}
        records.append(rec)
    return records


def _ci(v: list[float], digits: int = 2, signed: bool = False) -> str:
    m, lo, hi = v
    if math.isnan(m):
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def markdown(records: list[dict], header: dict[str, Any]) -> str:
    m = header["machine"]
    peers = {r["system"]: r["peer_versions"] for r in records if r.get("peer_versions")}
    st = next(r["start"] for r in records if r.get("start"))
    lines = [f"### {header['date']} — learning benchmark, `{header['toy']}` toy", "",
             f"- command: `{header['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores (shared with other work), GPU: {m['gpu'] or 'none'}; "
             f"1 torch thread per run, {header['jobs']} run(s) at a time; load average at start "
             f"{header['load_start']}, at end {header['load_end']}; detoxrl commit {header['commit']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if v)
             + "".join(f"; {s} venv: " + ", ".join(f"{k} {v}" for k, v in pv.items()) for s, pv in peers.items()),
             f"- {header['steps']} steps x 16 sampled responses, seeds {','.join(map(str, header['seeds']))}; "
             f"end = mean of the last {min(LAST, header['steps'] - 1)} steps; mean [95% t-interval] over seeds; "
             f"toxic = P(hate) > 0.5 under the reward classifier; KL = the system's own k1 KL to the start, nats per "
             f"response; targets (issue 9): toxic end <= {TARGETS['toxic_end']}, KL <= {TARGETS['kl_end']}, "
             f"distinct-2 end/start >= {TARGETS['distinct2_rel']}",
             f"- start = the untrained policy, step 1 of all {st['runs_pooled']} runs in the table pooled: reward "
             f"{st['reward']:.2f}, toxic share {st['toxic_share']:.3f} (distinct-2 is relative to each run's own "
             f"step 1: it depends on how many responses of a batch share a prompt)", "",
             "| configuration | seeds ok | reward end | reward gain | gain/step | toxic end | KL end | KL max "
             "| distinct-2 end/start | wall s/run | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["summary"]
        if not s:
            lines.append(f"| {r['config']} | 0 | " + " - |" * 8 + " error |")
            continue
        met = r["meets_targets"]
        verdict = "all met" if all(met.values()) else "missed: " + ", ".join(k for k, v in met.items() if not v)
        lines.append(f"| {r['config']} | {len(r['per_seed'])}/{len(r['seeds'])} | {_ci(s['reward_end'])} | "
                     f"{_ci(s['reward_gain'], signed=True)} | {_ci(s['gain_per_step'], 3, True)} | "
                     f"{_ci(s['toxic_end'])} | {_ci(s['kl_end'])} | {_ci(s['kl_max'])} | "
                     f"{_ci(s['distinct2_rel'])} | {s['wall_s'][0]:.0f} | {verdict} |")
    lines += ["", "Configurations: " + "; ".join(
        f"`{r['config']}` {r['about']}" + (f" (`{' '.join(r['overrides'])}`)" if r["overrides"] else "")
        for r in records)]
    errs = [f"- `{r['config']}` seed {s}: {e.splitlines()[-1][:300] if e.strip() else e}"
            for r in records for s, e in (r.get("errors") or {}).items()]
    if errs:
        lines += ["", "Failed runs:", *errs]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", choices=("t5", "gpt2"), default="t5")
    p.add_argument("--configs", default="default,seeds,trl011-lr1.41e-5",
                   help="comma list of configuration names (--list), trl011[-nodrop]-lr<LR>, trl112-lr<LR>")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="define a configuration: NAME='key=value key=value' (trainer overrides; repeatable)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed to one run")
    p.add_argument("--fresh", action="store_true", help="rerun even where a cached raw run exists")
    p.add_argument("--cached-only", action="store_true", help="report the cached runs only, run nothing (tables "
                   "of runs measured earlier)")
    p.add_argument("--runs", type=Path, default=None, help="folder of the cached raw runs (default "
                   "$DETOXRL_CACHE/bench/learning-runs)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--list", action="store_true", help="print the named configurations and exit")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (start is step 1, end the last steps after it)")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.runs is None:
        from benchmarks.assets import cache_root

        args.runs = cache_root() / "learning-runs"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_detoxrl_worker(args.worker)
    if args.list:
        for name, (about, overrides) in CONFIGS.items():
            print(f"{name}: {about}\n    {' '.join(overrides) or '(no overrides)'}")
        print("trl011-lr<LR>: TRL 0.11.4 PPO (both toys; trl011-nodrop-lr<LR>: model dropout 0); trl112-lr<LR>: "
              "TRL 1.12 PPO (gpt2 toy)")
        return 0
    from benchmarks import json_only_stdout

    json_out = json_only_stdout()
    import torch
    import transformers

    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)
    custom = {}
    for item in args.custom:
        name, _, rest = item.partition("=")
        custom[name.strip()] = shlex.split(rest)
    configs = [resolve_configuration(n.strip(), custom) for n in args.configs.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]

    def log(msg: str) -> None:
        print(f"[learning] {msg}", file=sys.stderr, flush=True)

    toy = _toys()[args.toy]
    header = {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "toy": toy.name,
              "command": "python -m benchmarks.learning " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "load_start": load_average(), "jobs": args.jobs,
              "steps": args.steps, "seeds": seeds, "commit": _commit()}
    records = measure_toy(toy, configs, seeds, args.steps, args, log)
    header["load_end"] = load_average()
    for rec in records:
        rec.update(machine=header["machine"], versions=header["versions"], date=header["date"],
                   command=header["command"])
        print(json.dumps(rec), file=json_out, flush=True)
    if not args.no_append and records:
        with open(args.results, "a") as f:
            f.write("\n" + markdown(records, header))
        log(f"appended the table to {args.results}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
