"""The PPO training loop. Reads top to bottom; each step of one PPO iteration is numbered as in DESIGN.md.

    setup: accelerator, data, models (policy + value head, reference, reward), optimizer, resume
    for each step:
        1. prompts      this rank's shard of the shuffled prompt set
        2. rollout      batched sampling from the policy (LoRA on)
        3. reward       decode, re-tokenize for each classifier, score in length-sorted batches
        4. reference    log-probs under the frozen reference; old log-probs and values under the policy
        5. advantages   per-token -beta*KL + score on the last token; GAE; whitening over the global batch
        6. PPO epochs   clipped policy + value losses over shuffled mini-batches with gradient accumulation
        7. bookkeeping  KL controller, metrics (reduced over ranks), samples, checkpoint, stop request
    finish: final adapter + value head, before/after evaluation

SIGTERM, SIGINT and SIGUSR1 ask for a clean stop: every rank finishes the current step, the ranks agree on it at
the step boundary, write a checkpoint together, and `train` returns with `stopped_by` set (the CLI exits with
status 75, cli.EXIT_STOPPED). Running the same command again resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from detoxrl.launch.devices import gpu_index, place_auxiliary
from detoxrl.train import assets, checkpoint as ckpt
from detoxrl.train.config import Config, PPOConfig, config_hash, to_dict, to_yaml
from detoxrl.train.data import PromptSampler, build_prompts, load_rows
from detoxrl.train.distributed import (accumulating, describe, fill_deepspeed_config, gathered_trainable,
                                       generation_weights, make_accelerator, models_built_whole, zero_stage)
from detoxrl.train.models import (Rollout, build_policy, build_reference_copy, context_window, count_parameters,
                                  detect_kind, generate_rollouts, load_tokenizer, reference_logprobs, resolve_device,
                                  resolve_dtype, sampling_mismatches)
from detoxrl.train.advantages import critic_free_advantages, decoupled_gae, value_clip_range
from detoxrl.train.ppo_math import (AdaptiveKLController, FixedKLController, RunningMoments, aggregate_loss,
                                    entropy_from_logits, explained_variance, kl_estimate, logprobs_from_logits,
                                    loss_denominator, masked_mean, masked_whiten, normalize_and_clip,
                                    per_token_rewards, policy_loss, value_loss)
from detoxrl.train.reward import RewardModel, build_reward
from detoxrl.train.tracking import (RunLogger, distinct_n, duplicate_share, package_versions, setup_logging,
                                    write_json)

log = logging.getLogger("detoxrl.train")


class NonFiniteLossError(RuntimeError):
    """Too many PPO steps in a row produced a NaN/inf loss."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM / SIGINT / SIGUSR1 so the loop stops at the next step boundary, after a checkpoint.

    A second SIGINT aborts at once (KeyboardInterrupt), and so does a SIGTERM after a SIGINT: that is how torchrun
    (`accelerate launch`) relays a second Ctrl-C to its workers. Repeated SIGTERM / SIGUSR1 are only logged: SLURM
    and launchers often deliver one request twice (to the process and through its parent).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: finishing the current step, then writing a checkpoint and stopping (Ctrl-C "
                        "again aborts at once)", self.name)
        elif signum == signal.SIGINT or (signum == signal.SIGTERM and self.signum == signal.SIGINT):
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} after {self.name}: aborted")
        else:
            log.warning("received %s again: already stopping after this step", signal.Signals(signum).name)


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    final_dir: Optional[Path]
    metrics: list[dict[str, float]]           # metrics of the steps run in this process (main process only)
    evaluation: Optional[dict[str, Any]]      # before/after held-out figures when evaluation.before_after
    policy: Any = None                        # the trained PolicyWithValue (unwrapped), for in-process callers
    stopped_by: Optional[str] = None
    is_main: bool = True                      # False on every rank but the main process          # signal name when a stop request ended the run early (checkpointed)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
class PhaseTimer:
    """Wall seconds per phase; synchronises CUDA once per phase boundary so timings are honest."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average per-rank scalars over ranks (ranks hold equal batch sizes, so this is the global mean)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def sum_reducer(accelerator):
    """A `reduce_fn` for ppo_math's global statistics, or None on one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").to(t.device)


def any_rank(accelerator, flag: bool) -> bool:
    """True if `flag` is true on any rank (keeps ranks in lock-step when skipping an update)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def draw_max_new_tokens(cfg: Config, step: int) -> int:
    rng_range = cfg.generation.max_new_tokens_range
    if rng_range is None:
        return cfg.generation.max_new_tokens
    # Seeded by (seed, step): the same on every rank and after a resume.
    return int(np.random.default_rng([cfg.run.seed, step]).integers(rng_range[0], rng_range[1] + 1))


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def forward_in_chunks(policy, rollout: Rollout, chunk: int, temperature: float, want_values: bool = True,
                      group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs and values (B, T) of the sampled responses, without gradients (values 0 without a critic).
    `chunk` rows at a time, a multiple of `group` (responses per prompt: seq2seq encodes each prompt once)."""
    logps, values = [], []
    with torch.no_grad():
        for s in range(0, rollout.response_ids.shape[0], chunk):
            sl = slice(s, s + chunk)
            logits, v = policy(rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.response_ids[sl],
                               want_values=want_values, group=group)
            logps.append(logprobs_from_logits(logits, rollout.response_ids[sl], temperature).float())
            values.append(v.float() if want_values else torch.zeros_like(logps[-1]))
    return torch.cat(logps), torch.cat(values)


def heldout_evaluation(policy, tokenizer, prompts: list[list[int]], prompt_texts: list[str], reward: RewardModel,
                       cfg: Config, device: torch.device, synced_gpus: bool = False) -> dict[str, Any]:
    """Mean toxicity and reward of held-out responses, sampled with a fixed seed (does not disturb training RNG)."""
    term = reward.terms[cfg.evaluation.term]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 12345)
        rollout = generate_rollouts(policy, prompts, tokenizer, cfg.generation, cfg.generation.max_new_tokens, device,
                                    synced_gpus)
    responses = decode_responses(tokenizer, rollout)
    toxicity = term.label_probability(responses, cfg.evaluation.toxic_label)
    total, _ = reward.score(prompt_texts, responses)
    return {"toxicity_mean": toxicity.mean().item(), "toxicity_std": toxicity.std().item() if len(responses) > 1
            else 0.0, "reward_mean": total.mean().item(), "num_samples": len(responses),
            "samples": [{"prompt": p, "response": r, "toxicity": t}
                        for p, r, t in zip(prompt_texts[:8], responses[:8], toxicity[:8].tolist())]}


# --------------------------------------------------------------------------------------------------------------
# 6. The PPO update (a function of its own: the distributed equivalence test calls it on a fixed rollout)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class UpdateBatch:
    """This rank's share of a step's rollouts, as the PPO update reads them; every tensor has B rows."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor             # (B, T) float: 1 on real response tokens
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None  # for a KL loss term (ppo.kl.mode: loss)


@dataclass
class LossTerms:
    """What one step's loss is made of (fixed for the step; the defaults are plain PPO with a critic)."""
    value: bool = True                   # a critic is trained (ppo.estimator: gae)
    value_clip: Optional[float] = 0.2    # the step's value clip range (critic.value_clip), None = off
    policy: bool = True                  # False during critic.warmup_steps: the policy's terms weigh 0, no step
    kl_coef: float = 0.0                 # > 0: kl_coef x KL(policy || ref) as a loss term (ppo.kl.mode: loss)
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"      # ppo.loss_aggregation
    norm_constant: Optional[float] = None  # its constant for token_sum_norm


@dataclass
class UpdateResult:
    stats: dict[str, list[float]]  # one entry per micro-batch (grad_norm: per optimizer step)
    skipped: int                   # mini-batches skipped on every rank (non-finite loss, or ratio over threshold)
    nonfinite: int                 # ... of which for a non-finite loss


def micro_batch_loss(policy, batch: UpdateBatch, ids: torch.Tensor, ppo: PPOConfig, temperature: float,
                     terms: LossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy [+ kl_coef * KL], each aggregated
    over `ids` as `terms.aggregation` says (the caller rescales to the global mini-batch)."""
    logits, values = policy(batch.prompt_ids[ids], batch.prompt_mask[ids], batch.response_ids[ids],
                            want_values=terms.value)
    m = batch.mask[ids]
    agg, const = terms.aggregation, terms.norm_constant
    logp = logprobs_from_logits(logits, batch.response_ids[ids], temperature).float()
    pg_loss, pg_stats = policy_loss(logp, batch.old_logp[ids], batch.advantages[ids], m, ppo.clip_range, agg, const)
    policy_weight = 1.0 if terms.policy else 0.0  # a zero weight keeps the policy's parameters in the graph (DDP)
    # the entropy of the distribution sampled from (tempered); without gradients when it is only logged
    with torch.enable_grad() if ppo.entropy_coef and terms.policy else torch.no_grad():
        entropy = aggregate_loss(entropy_from_logits(logits.float() / temperature), m, agg, const)
    loss = policy_weight * (pg_loss - ppo.entropy_coef * entropy)
    stats = {"policy_loss": pg_loss, "entropy": entropy, "clipfrac": pg_stats["clipfrac"],
             "approx_kl": pg_stats["approx_kl"], "ratio_mean": pg_stats["ratio_mean"]}
    if terms.kl_coef > 0:
        kl_loss = aggregate_loss(kl_estimate(logp, batch.ref_logp[ids], terms.kl_estimator), m, agg, const)
        loss = loss + policy_weight * terms.kl_coef * kl_loss
        stats["kl_loss"] = kl_loss
    if terms.value:
        vf_loss, vf_stats = value_loss(values.float(), batch.old_values[ids], batch.returns[ids], m, terms.value_clip,
                                       agg, const)
        loss = loss + ppo.vf_coef * vf_loss
        stats.update(value_loss=vf_loss, vf_clipfrac=vf_stats["vf_clipfrac"])
    stats["loss"] = loss
    return loss, stats


@contextmanager
def policy_held(optimizer, scheduler, deepspeed: bool, hold: bool) -> Iterator[Callable[[], None]]:
    """During critic warm-up: the policy's parameter group takes no step. Yields a callable to run before every
    optimizer step (DeepSpeed steps inside the last backward, so it runs at each mini-batch's start there too).
    Without DeepSpeed the policy's gradients are dropped, so AdamW leaves its state alone; DeepSpeed's flat
    partitions step as a whole, so the group's learning rate is 0 instead. The schedule's rate is restored after."""
    groups = [g for g in optimizer.param_groups if g.get("name") == "policy"]
    if not hold or not groups:
        yield lambda: None
        return

    def hold_now() -> None:
        for g in groups:
            g["lr"] = 0.0
            if not deepspeed:
                for p in g["params"]:
                    p.grad = None

    try:
        yield hold_now
    finally:
        for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr


def agree_to_skip(accelerator, loss: torch.Tensor, ratio_mean: torch.Tensor, threshold: float) -> tuple[bool, bool]:
    """(skip, non-finite): whether ANY rank saw a non-finite loss or a mean ratio over `threshold`. One all-reduce,
    so every rank takes the same decision and collectives stay in lock-step."""
    flags = torch.tensor([float(not torch.isfinite(loss).item()), float(ratio_mean.item() > threshold)],
                         device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags.sum().item() > 0), bool(flags[0].item() > 0)


def ppo_update(accelerator, policy, optimizer, scheduler, batch: UpdateBatch, ppo: PPOConfig, temperature: float,
               shuffle_seed: int, terms: Optional[LossTerms] = None) -> UpdateResult:
    """PPO epochs over shuffled mini-batches of this rank's rollouts; micro-batches accumulate gradients.

    All ranks run the same mini-batches and micro-batches and take the same skip decisions. Each loss is a token
    mean over the GLOBAL mini-batch (all ranks, all its micro-batches): the update is the same however the batch is
    split across ranks and micro-batches (DDP and DeepSpeed average gradients over ranks, and accumulation divides by
    the number of micro-batches, so a micro-batch's token mean is rescaled by its share of the global tokens).
    """
    terms = terms or LossTerms()
    with policy_held(optimizer, scheduler, zero_stage(accelerator) is not None, not terms.policy) as hold:
        return _ppo_epochs(accelerator, policy, optimizer, scheduler, batch, ppo, temperature, shuffle_seed, terms,
                           hold)


def _ppo_epochs(accelerator, policy, optimizer, scheduler, batch: UpdateBatch, ppo: PPOConfig, temperature: float,
                shuffle_seed: int, terms: LossTerms, hold: Callable[[], None]) -> UpdateResult:
    deepspeed = zero_stage(accelerator) is not None
    world, gas = accelerator.num_processes, ppo.gradient_accumulation_steps
    micro = ppo.mini_batch_size // gas
    params = [p for p in policy.parameters() if p.requires_grad]
    reduce_fn = sum_reducer(accelerator)
    stats: dict[str, list[float]] = {k: [] for k in (
        "policy_loss", "value_loss", "loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac", "ratio_mean",
        "kl_loss", "grad_norm")}
    skipped = nonfinite = 0
    shuffle = torch.Generator().manual_seed(shuffle_seed)  # same on every rank
    B = batch.response_ids.shape[0]
    agg, const = terms.aggregation, terms.norm_constant
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(B, generator=shuffle).to(batch.mask.device)
        minibatches = [order[s:s + ppo.mini_batch_size] for s in range(0, B, ppo.mini_batch_size)]
        # each loss is normalised by the GLOBAL mini-batch's tokens (or responses): one all-reduce per epoch
        denominators = torch.stack([loss_denominator(batch.mask[mb], agg, const) for mb in minibatches])
        global_denominators = (reduce_fn(denominators) if reduce_fn else denominators).tolist()
        for mb, n_global in zip(minibatches, global_denominators):
            if deepspeed:  # (critic warm-up) the engine steps inside the mini-batch's last backward
                hold()
            micro_batches = [mb[s:s + micro] for s in range(0, len(mb), micro)]
            bad = bad_nonfinite = False
            # DeepSpeed cannot drop gradients it has already reduced part-way through an accumulation, so with
            # several micro-batches the skip decision comes first, from a forward pass without gradients.
            decide_first = deepspeed and gas > 1
            if decide_first:
                with torch.no_grad():
                    for ids in micro_batches:
                        loss, st = micro_batch_loss(policy, batch, ids, ppo, temperature, terms)
                        bad, bad_nonfinite = agree_to_skip(accelerator, loss, st["ratio_mean"], ppo.ratio_threshold)
                        if bad:
                            break
            for i, ids in enumerate(micro_batches):
                if bad:
                    break
                with accumulating(accelerator, policy, boundary=i == len(micro_batches) - 1):
                    loss, st = micro_batch_loss(policy, batch, ids, ppo, temperature, terms)
                    if not decide_first:
                        bad, bad_nonfinite = agree_to_skip(accelerator, loss, st["ratio_mean"], ppo.ratio_threshold)
                        if bad:
                            break
                    share = loss_denominator(batch.mask[ids], agg, const).item() * world * gas / n_global
                    accelerator.backward(loss * share)  # / gas (accelerate or the engine); mean over ranks
                for k, v in st.items():
                    stats[k].append(float(v.detach()))
            if bad:  # skip the whole mini-batch on every rank
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                nonfinite += int(bad_nonfinite)
                continue
            if not deepspeed:  # (critic warm-up) drop the policy's gradients before the step
                hold()
            if deepspeed:  # the engine clipped (gradient_clipping) and stepped in the last backward
                grad_norm = accelerator.clip_grad_norm_(params, ppo.max_grad_norm or 0.0)
            elif ppo.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, ppo.max_grad_norm)
            else:
                grad_norm = None
            if grad_norm is not None:
                stats["grad_norm"].append(float(grad_norm))
            optimizer.step()  # a no-op under DeepSpeed
            if not optimizer.step_was_skipped:  # fp16 overflow: no update, so the schedule does not advance either
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return UpdateResult(stats, skipped, nonfinite)


def place_models(cfg: Config, device: torch.device) -> tuple[list[torch.device], Optional[torch.device]]:
    """Devices of the reward terms and of the reference copy (None when shared) for this rank (launch/devices.py)."""
    copy_ref = cfg.reference.mode == "copy"
    requested = [t.device for t in cfg.reward.terms] + ([cfg.reference.device] if copy_ref else [])
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # a CPU run keeps `auto` on the CPU
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    names = place_auxiliary(requested, n_gpus, local_ranks, str(device))
    own = gpu_index(str(device))
    for key, name in zip([f"reward.terms.{i}.device" for i in range(len(cfg.reward.terms))] + ["reference.device"],
                         names):
        other = gpu_index(name)
        if other is not None and other < local_ranks and other != own:
            log.warning("%s=%s is also the GPU of training rank %d of this machine; it competes with that rank for "
                        "memory and time", key, name, other)
    devices = [resolve_device(n, device) for n in names]
    return devices[:len(cfg.reward.terms)], (devices[-1] if copy_ref else None)


def build_rewards_on(cfg: Config, devices: list[torch.device], policy_dtype: torch.dtype) -> RewardModel:
    """Every reward term on its own device, in its dtype (`auto`: the policy's on a GPU, float32 on the CPU)."""
    dtypes = [resolve_dtype(t.dtype, dev) if t.dtype != "auto" else (policy_dtype if dev.type == "cuda" else torch.float32)
              for t, dev in zip(cfg.reward.terms, devices)]
    return build_reward(cfg.reward.terms, assets.resolve, devices, dtypes)


def param_groups(policy, cfg: Config) -> list[dict[str, Any]]:
    """The policy's trainable parameters, then the critic's (value head, critic adapter) at `critic.lr`."""
    critic_ids = {id(p) for p in policy.critic_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"name": "policy", "params": [p for p in trainable if id(p) not in critic_ids]},
              {"name": "critic", "params": [p for p in trainable if id(p) in critic_ids],
               "lr": cfg.critic.lr or cfg.optim.lr}]
    return [g for g in groups if g["params"]]


def loss_terms(cfg: Config, step: int, kl_coef: float, returns: torch.Tensor, mask: torch.Tensor,
               reduce_fn) -> LossTerms:
    """This step's loss terms: critic or not, the value clip range, warm-up, the KL loss, the aggregation."""
    p, c = cfg.ppo, cfg.critic
    value = p.estimator == "gae"
    max_new = max(cfg.generation.max_new_tokens, (cfg.generation.max_new_tokens_range or [0, 0])[1])
    return LossTerms(
        value=value, value_clip=value_clip_range(c.value_clip, c.value_clip_range, returns, mask, reduce_fn)
        if value else None, policy=step >= c.warmup_steps,
        kl_coef=kl_coef if p.kl.mode == "loss" else 0.0, kl_estimator=p.kl.estimator,
        aggregation=p.loss_aggregation, norm_constant=float(p.loss_norm_constant or max_new))


def debug_record(name: str, record: dict[str, Any]) -> None:
    """Test hook: with DETOXRL_DEBUG_DIR set, each rank appends JSON lines to <dir>/<name> (prompts, lengths...)."""
    folder = os.environ.get("DETOXRL_DEBUG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / name, "a") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def train(cfg: Config) -> RunResult:
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopRequest) -> RunResult:
    # ---- setup --------------------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.run.device, cfg.ppo.gradient_accumulation_steps)
    if cfg.run.cpu_threads:  # after the accelerator, which sets its own count for multi-CPU runs
        torch.set_num_threads(cfg.run.cpu_threads)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    setup_logging(is_main)
    device = accelerator.device
    out = Path(cfg.run.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)  # the same start whatever ran before in this process (resumes restore all three)
    np.random.seed(cfg.run.seed)

    with accelerator.main_process_first():  # rank 0 builds the demo assets / downloads; others then read the cache
        policy_path = assets.resolve(cfg.policy.model, "policy")
        data_path = assets.resolve(cfg.data.dataset, "data")
        kind = detect_kind(policy_path, cfg.policy.kind, cfg.policy.revision, cfg.policy.trust_remote_code)
        tokenizer = load_tokenizer(policy_path, kind, cfg.policy.revision, cfg.policy.trust_remote_code)
        train_rows = load_rows(data_path, cfg.data.split)
        eval_rows = load_rows(data_path, cfg.evaluation.split) if cfg.evaluation.before_after else None
    prompts = build_prompts(train_rows, cfg.data, tokenizer, kind, cfg.run.seed)
    k = cfg.ppo.k  # responses per prompt: a rank samples all k of its prompts (groups never straddle ranks)
    sampler = PromptSampler(len(prompts), cfg.ppo.batch_size // k, rank, world, cfg.run.seed)
    log.info("%d training prompts (%s, split %s), %d process(es), global batch %d responses (%d per prompt)",
             len(prompts), cfg.data.dataset, cfg.data.split, world, cfg.ppo.batch_size * world, k)
    if is_main:
        for why in sampling_mismatches(cfg.generation):
            log.warning("sampling and scoring distributions differ: %s; the PPO update is off-policy by that much",
                        why)

    stage = zero_stage(accelerator)  # None unless DeepSpeed
    if device.type == "cpu" and accelerator.mixed_precision != "no":
        raise ValueError(f"mixed precision {accelerator.mixed_precision} was requested, but this run trains on the "
                         f"CPU, which detoxrl does in float32: launch with --mixed_precision no")
    if stage == 3 and cfg.policy.quantization:
        raise ValueError("policy.quantization (bitsandbytes) cannot be combined with DeepSpeed ZeRO-3, which shards "
                         "the weights: use the ddp or zero2 strategy")
    dtype = resolve_dtype(cfg.policy.dtype, device, accelerator.mixed_precision)
    shared_ref = cfg.reference.mode == "shared"
    reward_devices, reference_device = place_models(cfg, device)
    with models_built_whole(accelerator):
        policy = build_policy(cfg.policy, policy_path, kind, device, dtype, shared_ref, cfg.run.seed, cfg.critic)
        reference = None if shared_ref else build_reference_copy(
            cfg.policy, cfg.reference, policy_path, kind, reference_device, dtype)
        reward = build_rewards_on(cfg, reward_devices, dtype)
    window = context_window(policy.lm.config) if kind == "causal" else None
    max_new = max(cfg.generation.max_new_tokens, (cfg.generation.max_new_tokens_range or [0, 0])[1])
    longest_prompt = max(len(p) for p in prompts.input_ids)
    if window is not None and longest_prompt + max_new > window:
        raise ValueError(f"prompt ({longest_prompt} tokens) + response ({max_new} tokens) exceeds the model's "
                         f"window of {window}; lower data.max_prompt_tokens or generation.max_new_tokens")
    total_params, trainable_params = count_parameters(policy)
    log.info("policy %s (%s, %s): %s parameters, %s trainable (%.3f%%)", cfg.policy.model, kind, dtype,
             f"{total_params:,}", f"{trainable_params:,}", 100.0 * trainable_params / total_params)

    from transformers import get_scheduler
    critic_free = cfg.ppo.estimator != "gae"
    if critic_free:  # no value loss: the head stays as it is and out of the optimizer (and of DDP's buckets)
        policy.v_head.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(policy, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay)
    minibatches = cfg.ppo.batch_size // cfg.ppo.mini_batch_size
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.run.total_steps * cfg.ppo.ppo_epochs * minibatches)
    if stage is not None:
        fill_deepspeed_config(accelerator, cfg.ppo.mini_batch_size, cfg.ppo.gradient_accumulation_steps,
                              cfg.ppo.max_grad_norm, policy.v_head.in_features)
    # the scheduler is NOT prepared: it steps once per optimizer step we take, identically in every strategy
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)

    kl_ctl = (AdaptiveKLController(cfg.ppo.kl.init_coef, cfg.ppo.kl.target, cfg.ppo.kl.horizon) if cfg.ppo.kl.adaptive
              else FixedKLController(cfg.ppo.kl.init_coef))
    moments = RunningMoments() if cfg.reward.normalize else None
    start_step, samples_seen, nonfinite_in_row, evaluation = 0, 0, 0, {}

    # ---- resume ---------------------------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    # Rank 0 cleans up and chooses; every rank then loads the same folder.
    from accelerate.utils import broadcast_object_list
    found = [ckpt.find_resume_checkpoint(ckpt_root, cfg.checkpoint.resume, is_main) if is_main else None]
    if world > 1:
        broadcast_object_list(found)
    resume_from = found[0]
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        diff = ckpt.config_differences(state["config"], to_dict(cfg))
        if diff and not cfg.checkpoint.allow_config_change:
            raise ValueError(f"refusing to resume from {resume_from}: the config changed in keys that alter the "
                             f"run: {', '.join(diff)}. Set checkpoint.allow_config_change=true to force it, or "
                             f"checkpoint.resume=never with a new run.output_dir.")
        if state["config"]["run"]["total_steps"] != cfg.run.total_steps and cfg.optim.scheduler != "constant":
            log.warning("run.total_steps changed from %d to %d: the %s learning-rate schedule now spans the new "
                        "length, so the run differs from one started with %d steps", state["config"]["run"][
                            "total_steps"], cfg.run.total_steps, cfg.optim.scheduler, cfg.run.total_steps)
        t_load = time.perf_counter()
        state = ckpt.load_checkpoint(resume_from, accelerator, policy, optimizer, scheduler)
        start_step, samples_seen = state["step"], state["samples_seen"]
        if not state["rng_restored"]:  # other world size: still reproducible, from (seed, rank, step)
            torch.manual_seed(cfg.run.seed + 1 + rank + 1_000_003 * start_step)
        sampler.load_state_dict(state["sampler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if moments is not None and state.get("reward_moments"):
            moments.load_state_dict(state["reward_moments"])
        evaluation = state.get("evaluation", {})
        log.info("resumed from %s at step %d (%d samples seen; loaded in %.2f s)", resume_from, start_step,
                 samples_seen, time.perf_counter() - t_load)
    if start_step >= cfg.run.total_steps:
        log.info("nothing to do: already at step %d of %d", start_step, cfg.run.total_steps)

    devices = {"policy": str(device), "reference": str(reference.device) if reference else f"{device} (shared base)",
               "reward": {t.name: str(t.device) for t in reward.terms}}
    if world > 1:
        from accelerate.utils import gather_object
        devices_by_rank = gather_object([devices])
    if is_main:
        write_json(out / "run_info.json", {
            **describe(accelerator), "policy_kind": kind, "policy_dtype": str(dtype),
            "reward_dtypes": {t.name: str(t.model.dtype) for t in reward.terms},
            "reference_dtype": str(next(reference.lm.parameters()).dtype) if reference else str(dtype),
            "quantization": cfg.policy.quantization, "devices": devices,
            "devices_by_rank": devices_by_rank if world > 1 else [devices],
            "parameters": {"total": total_params, "trainable": trainable_params},
            "packages": package_versions(), "config_hash": config_hash(cfg),
            "resumed_from": str(resume_from) if resume_from else None})

    eval_prompts = eval_texts = None
    if cfg.evaluation.before_after:
        held = build_prompts(eval_rows, cfg.data, tokenizer, kind, cfg.run.seed)
        n = min(cfg.evaluation.num_samples, len(held))
        eval_prompts, eval_texts = held.input_ids[:n], held.texts[:n]
        if "before" not in evaluation:
            with generation_weights(accelerator, policy, cfg.generation.zero3_gather_weights) as synced:
                evaluation["before"] = heldout_evaluation(unwrapped, tokenizer, eval_prompts, eval_texts, reward, cfg,
                                                          device, synced)
            log.info("held-out toxicity before training: %.4f (mean reward %.4f, %d prompts)",
                     evaluation["before"]["toxicity_mean"], evaluation["before"]["reward_mean"], n)

    # Sampling differs per rank (different prompts AND different random streams); model init was identical.
    if resume_from is None:
        torch.manual_seed(cfg.run.seed + 1 + rank)
    logger = RunLogger(out, is_main, cfg.run.total_steps, start_step, cfg.logging.tensorboard,
                       cfg.logging.progress_bar)
    history: list[dict[str, float]] = []
    reduce_fn = sum_reducer(accelerator)
    temp = cfg.generation.temperature
    stopped_by: Optional[str] = None

    def save(step_done: int) -> Path:
        state = {"step": step_done, "samples_seen": samples_seen, "sampler": sampler.state_dict(),
                 "kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict() if moments else None,
                 "evaluation": evaluation, "world_size": world, "config": to_dict(cfg),
                 "config_hash": config_hash(cfg), "packages": package_versions()}
        logger.flush()  # the curves up to a checkpoint survive a later kill -9
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(accelerator, policy, optimizer, scheduler, state, ckpt_root, step_done,
                                    cfg.checkpoint.keep_last)
        if is_main:
            log.info("checkpoint %s written in %.2f s (%.1f MB)", path, time.perf_counter() - t0,
                     sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6)
        return path

    try:
        for step in range(start_step, cfg.run.total_steps):
            timer = PhaseTimer(device)
            t_step = time.perf_counter()

            # 1. prompts: this rank's shard of the global batch (batch_size / k prompts)
            idx = sampler.next_indices()
            batch_prompts = [prompts.input_ids[i] for i in idx]
            batch_texts = [prompts.texts[i] for i in idx for _ in range(k)]  # one per response

            # 2. rollout: batched sampling, chunked by generation.rollout_batch_size; k responses per prompt
            with timer("time/generate"), generation_weights(accelerator, policy,
                                                            cfg.generation.zero3_gather_weights) as synced:
                rollout = generate_rollouts(unwrapped, batch_prompts, tokenizer, cfg.generation,
                                            draw_max_new_tokens(cfg, step), device, synced_gpus=synced, k=k)
            mask = rollout.response_mask.float()

            # 3. reward: response text re-tokenized by each classifier; scored in length-sorted batches
            with timer("time/reward"):
                responses = decode_responses(tokenizer, rollout)
                raw_scores, term_scores = reward.score(batch_texts, responses)
                scores = raw_scores.clone()
                if cfg.ppo.missing_eos_penalty is not None:
                    scores[~rollout.ended.cpu()] -= cfg.ppo.missing_eos_penalty
                if moments is not None:
                    moments.update(scores, reduce_fn)
                scores = normalize_and_clip(scores, moments, cfg.reward.clip,
                                            cfg.reward.normalize_shift_mean).to(device)

            # 4. reference log-probs (frozen starting policy), then old log-probs and values of the policy
            with timer("time/reference"):
                ref_logp = reference_logprobs(unwrapped, reference, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.response_ids, temp, forward=policy, group=k)
            with timer("time/old_logprobs"):
                old_logp, old_values = forward_in_chunks(policy, rollout, cfg.generation.rollout_batch_size * k, temp,
                                                         want_values=not critic_free, group=k)

            # 5. advantages: per-token rewards (-beta*KL unless the KL is a loss term, + the score on the last
            #    token); GAE with the critic, or a critic-free estimator; normalised over the global batch
            kl_in_reward = kl_ctl.value if cfg.ppo.kl.mode == "reward" else 0.0
            rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, kl_in_reward, cfg.ppo.kl.estimator)
            if critic_free:
                advantages = critic_free_advantages(cfg.ppo.estimator, rewards, mask, k, cfg.ppo.gamma,
                                                    cfg.ppo.group_std_scale, cfg.ppo.whiten_advantages, reduce_fn)
                returns = torch.zeros_like(advantages)
            else:
                advantages, returns = decoupled_gae(rewards, old_values, mask, cfg.ppo.gamma, cfg.ppo.lam,
                                                    cfg.ppo.lam if cfg.critic.lam is None else cfg.critic.lam)
                if cfg.ppo.whiten_advantages:
                    advantages = masked_whiten(advantages, mask, shift_mean=True, reduce_fn=reduce_fn)
            terms = loss_terms(cfg, step, kl_ctl.value, returns, mask, reduce_fn)

            # 6. PPO epochs over shuffled mini-batches; micro-batches accumulate gradients (during the critic's
            #    warm-up the policy's parameters take no step)
            with timer("time/ppo_update"):
                update = ppo_update(accelerator, policy, optimizer, scheduler, UpdateBatch(
                    rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, mask, old_logp, old_values,
                    advantages, returns, ref_logp), cfg.ppo, temp, shuffle_seed=cfg.run.seed * 100003 + step,
                    terms=terms)
            stats, skipped, nonfinite = update.stats, update.skipped, update.nonfinite
            debug_record(f"rank-{rank:05d}.jsonl", {
                "step": step + 1, "rank": rank, "prompt_indices": idx, "response_lengths":
                rollout.response_mask.sum(1).tolist(), "loss": stats["loss"], "skipped": skipped})

            if nonfinite:
                nonfinite_in_row += 1
                log.warning("step %d: %d mini-batch(es) had a non-finite loss and were skipped (%d step(s) in a "
                            "row)", step + 1, nonfinite, nonfinite_in_row)
                if nonfinite_in_row >= cfg.run.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} PPO steps in a row had non-finite losses (run.max_nonfinite_steps="
                        f"{cfg.run.max_nonfinite_steps}); stopping. The last checkpoint and the weights before "
                        f"these steps are kept. Lower optim.lr or check the reward model's outputs.")
            else:
                nonfinite_in_row = 0
            if skipped and not nonfinite:
                log.warning("step %d: skipped %d mini-batch(es) whose mean ratio exceeded ppo.ratio_threshold=%g",
                            step + 1, skipped, cfg.ppo.ratio_threshold)

            # 7. bookkeeping: KL controller, metrics reduced over ranks, samples, checkpoint
            kl_per_sample = (kl * mask).sum(1)
            global_scores = accelerator.gather(raw_scores.to(device)).float()
            kl_mean_global = reduce_mean(accelerator, {"kl": kl_per_sample.mean().item()})["kl"]
            kl_coef_used = kl_ctl.value
            kl_ctl.update(kl_mean_global, cfg.ppo.batch_size * world)
            samples_seen += cfg.ppo.batch_size * world
            elapsed = time.perf_counter() - t_step
            n_tokens = mask.sum().item()
            local = {
                "objective/kl": kl_per_sample.mean().item(),
                "objective/kl_coef": kl_coef_used,
                "objective/entropy": float(np.mean(stats["entropy"])) if stats["entropy"] else float("nan"),
                "objective/score_normalized_mean": scores.mean().item(),
                "ppo/loss/policy": float(np.mean(stats["policy_loss"])) if stats["policy_loss"] else float("nan"),
                "ppo/loss/value": float(np.mean(stats["value_loss"])) if stats["value_loss"] else float("nan"),
                "ppo/loss/total": float(np.mean(stats["loss"])) if stats["loss"] else float("nan"),
                "ppo/policy/clipfrac": float(np.mean(stats["clipfrac"])) if stats["clipfrac"] else float("nan"),
                "ppo/policy/approx_kl": float(np.mean(stats["approx_kl"])) if stats["approx_kl"] else float("nan"),
                "ppo/policy/ratio_mean": float(np.mean(stats["ratio_mean"])) if stats["ratio_mean"] else float("nan"),
                "ppo/val/clipfrac": float(np.mean(stats["vf_clipfrac"])) if stats["vf_clipfrac"] else float("nan"),
                "ppo/grad_norm": float(np.mean(stats["grad_norm"])) if stats["grad_norm"] else float("nan"),
                "ppo/val/explained_variance": explained_variance(old_values, returns, mask).item()
                if not critic_free else float("nan"),
                "ppo/advantages_mean": masked_mean(advantages, mask).item(),
                "ppo/advantages_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
                "ppo/skipped_minibatches": float(skipped),
                "env/response_length_mean": rollout.response_mask.sum(1).float().mean().item(),
                "env/response_ended_share": rollout.ended.float().mean().item(),
                # reward hacking shows as falling distinct-n / rising duplicates next to a climbing KL
                "env/distinct_2": distinct_n(responses, 2) or 0.0,
                "env/duplicate_share": duplicate_share(responses),
                "perf/samples_per_s": rollout.response_ids.shape[0] * world / elapsed,
                "perf/tokens_per_s": n_tokens * world / elapsed,
                **{k: v for k, v in timer.seconds.items()},
                "time/step": elapsed,
            }
            if terms.kl_coef > 0:
                local["ppo/loss/kl"] = float(np.mean(stats["kl_loss"])) if stats["kl_loss"] else float("nan")
            for t, s in zip(reward.terms, term_scores):
                local[f"env/reward_term/{t.name}/{t.cfg.label}"] = s.mean().item()
            metrics = reduce_mean(accelerator, local)
            metrics["env/reward_mean"] = global_scores.mean().item()
            metrics["env/reward_std"] = global_scores.std().item() if global_scores.numel() > 1 else 0.0
            metrics["lr"] = scheduler.get_last_lr()[0]
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == cfg.run.total_steps:
                logger.scalars(done, metrics)
            if cfg.logging.sample_every and done % cfg.logging.sample_every == 0:
                logger.samples(done, [{"prompt": p[-200:], "response": r, "reward": float(s)} for p, r, s in
                                      zip(batch_texts, responses, raw_scores.tolist())][:cfg.logging.num_samples])
            logger.progress(done, metrics["env/reward_mean"], metrics["objective/kl"])
            history.append({"step": done, **metrics})
            saved = bool(cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0)
            if saved and done < cfg.run.total_steps:
                save(done)
            # a stop request on any rank stops every rank here, after the same step (one tiny all-reduce)
            if done < cfg.run.total_steps and any_rank(accelerator, stop.signum is not None):
                stopped_by = stop.name or "a signal on another rank"
                path = ckpt.step_dir(ckpt_root, done) if saved else save(done)
                log.warning("stopped after step %d of %d (%s); checkpoint %s. Run the same command again to resume.",
                            done, cfg.run.total_steps, stopped_by, path)
                break
    finally:
        logger.close()
    if stopped_by is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return RunResult(out, done, None, history, None, unwrapped, stopped_by=stopped_by, is_main=is_main)

    # ---- finish: final adapter + value head, checkpoint, before/after ------------------------------------------
    steps_done = max(start_step, cfg.run.total_steps)
    if cfg.checkpoint.every_steps and start_step < cfg.run.total_steps:  # else resumed from this very checkpoint
        save(steps_done)
    final_dir = out / "final"
    with gathered_trainable(accelerator, policy):  # collective under ZeRO-3: every rank gathers, rank 0 writes
        if is_main:
            tmp = out / "final.tmp"
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            ckpt.save_policy_files(unwrapped, tmp)
            tokenizer.save_pretrained(str(tmp))
            if final_dir.exists():
                import shutil
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
        if os.environ.get("DETOXRL_DEBUG_DIR"):  # test hook: every rank's copy of the trainable weights
            from safetensors.torch import save_file
            save_file({k: v.detach().float().cpu().contiguous() for k, v in unwrapped.trainable_state_dict().items()},
                      str(Path(os.environ["DETOXRL_DEBUG_DIR"]) / f"rank-{rank:05d}-trainable.safetensors"))
    if cfg.evaluation.before_after:
        with generation_weights(accelerator, policy, cfg.generation.zero3_gather_weights) as synced:
            evaluation["after"] = heldout_evaluation(unwrapped, tokenizer, eval_prompts, eval_texts, reward, cfg,
                                                     device, synced)
        b, a = evaluation["before"], evaluation["after"]
        evaluation["toxicity_change_pct"] = 100.0 * (a["toxicity_mean"] - b["toxicity_mean"]) / max(
            b["toxicity_mean"], 1e-12)
        if is_main:
            write_json(out / "eval_before_after.json", evaluation)
            print(f"\nheld-out toxicity ({b['num_samples']} prompts): before {b['toxicity_mean']:.4f} "
                  f"(std {b['toxicity_std']:.4f})  after {a['toxicity_mean']:.4f} (std {a['toxicity_std']:.4f})  "
                  f"change {evaluation['toxicity_change_pct']:+.1f}%\n"
                  f"held-out mean reward: before {b['reward_mean']:.4f}  after {a['reward_mean']:.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, steps_done, final_dir, history, evaluation or None, unwrapped, is_main=is_main)

