"""Step 6 of a PPO iteration: the PPO epochs over one step's `Experience` (a function of its own: the distributed
equivalence test calls it on a fixed batch).

    loss_terms        what this step's loss is made of (critic or not, value clip, warm-up, KL loss, aggregation)
    micro_batch_loss  clipped policy loss + value loss - entropy bonus [+ KL loss] of one micro-batch: the policy's
                      forward, then loss_maths on its outputs (through torch.compile with ppo.compile)
    micro_batches     a mini-batch's rows cut into micro-batches (length-sorted with ppo.bucket_by_length)
    ppo_update        epochs x shuffled mini-batches x accumulated micro-batches, every rank in lock-step
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from detoxrl.train.advantages import value_clip_range
from detoxrl.train.buckets import by_length, used_columns
from detoxrl.train.config import Config, PPOConfig
from detoxrl.train.distributed import accumulating, sum_reducer, zero_stage
from detoxrl.train.experience import Experience
from detoxrl.train.ppo_math import (aggregate_loss, entropy_from_logits, kl_estimate, logprobs_from_logits,
                                    loss_denominator, policy_loss, value_loss)


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


def rows_of(batch: Experience, ids: torch.Tensor, trim: bool) -> Experience:
    """The update's tensors of rows `ids`; with `trim`, without the padding columns none of them uses
    (buckets.used_columns: the losses are unchanged, the forward pass is smaller)."""
    p, r = used_columns(batch.prompt_mask[ids], batch.mask[ids]) if trim else (slice(None), slice(None))
    ref = batch.ref_logp[ids][:, r] if batch.ref_logp is not None else None
    return Experience(batch.prompt_ids[ids][:, p], batch.prompt_mask[ids][:, p], batch.response_ids[ids][:, r],
                      batch.mask[ids][:, r], batch.old_logp[ids][:, r], batch.old_values[ids][:, r],
                      batch.advantages[ids][:, r], batch.returns[ids][:, r], ref)


def micro_batch_loss(policy, batch: Experience, ids: torch.Tensor, ppo: PPOConfig, temperature: float,
                     terms: LossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy [+ kl_coef * KL], each aggregated
    over `ids` as `terms.aggregation` says (the caller rescales to the global mini-batch). With
    `ppo.bucket_by_length` the rows' unused padding columns are cut first."""
    mb = rows_of(batch, ids, ppo.bucket_by_length)
    logits, values = policy(mb.prompt_ids, mb.prompt_mask, mb.response_ids, want_values=terms.value)
    maths = compiled_loss_maths() if ppo.compile else loss_maths
    return maths(logits, values, mb, ppo.clip_range, ppo.entropy_coef, ppo.vf_coef, temperature, terms)


@functools.lru_cache(maxsize=None)
def compiled_loss_maths(backend: str = "inductor") -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """ppo.compile: `loss_maths` through torch.compile, its elementwise work fused, forward and backward (pure
    tensor maths on the policy's outputs, so it compiles under ZeRO-3 and quantization too). Tests: "aot_eager"."""
    return torch.compile(loss_maths, backend=backend)


def loss_maths(logits: torch.Tensor, values: Optional[torch.Tensor], mb: Experience, clip_range: float,
               entropy_coef: float, vf_coef: float, temperature: float,
               terms: LossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`micro_batch_loss` from the policy's logits and values on the rows `mb`."""
    m = mb.mask
    agg, const = terms.aggregation, terms.norm_constant
    logp = logprobs_from_logits(logits, mb.response_ids, temperature).float()
    pg_loss, pg_stats = policy_loss(logp, mb.old_logp, mb.advantages, m, clip_range, agg, const)
    policy_weight = 1.0 if terms.policy else 0.0  # a zero weight keeps the policy's parameters in the graph (DDP)
    # the entropy of the distribution sampled from (tempered); without gradients when it is only logged
    with torch.enable_grad() if entropy_coef and terms.policy else torch.no_grad():
        entropy = aggregate_loss(entropy_from_logits(logits.float() / temperature), m, agg, const)
    loss = policy_weight * (pg_loss - entropy_coef * entropy)
    stats = {"policy_loss": pg_loss, "entropy": entropy, "clipfrac": pg_stats["clipfrac"],
             "approx_kl": pg_stats["approx_kl"], "ratio_mean": pg_stats["ratio_mean"]}
    if terms.kl_coef > 0:
        kl_loss = aggregate_loss(kl_estimate(logp, mb.ref_logp, terms.kl_estimator), m, agg, const)
        loss = loss + policy_weight * terms.kl_coef * kl_loss
        stats["kl_loss"] = kl_loss
    if terms.value:
        vf_loss, vf_stats = value_loss(values.float(), mb.old_values, mb.returns, m, terms.value_clip, agg, const)
        loss = loss + vf_coef * vf_loss
        stats.update(value_loss=vf_loss, vf_clipfrac=vf_stats["vf_clipfrac"])
    stats["loss"] = loss
    return loss, stats


def micro_batches(batch: Experience, mb: torch.Tensor, micro: int, bucket: bool) -> list[torch.Tensor]:
    """The rows of mini-batch `mb` in micro-batches of `micro`: in shuffled order, or (`bucket`) sorted by length
    (longest first) so that each micro-batch's rows need few padding columns. Which rows form the mini-batch is
    the shuffle's alone; only their grouping into micro-batches changes, which the global token mean ignores."""
    if bucket:
        mb = mb[by_length(batch.mask[mb], batch.prompt_mask[mb])]
    return [mb[s:s + micro] for s in range(0, len(mb), micro)]


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


def ppo_update(accelerator, policy, optimizer, scheduler, batch: Experience, ppo: PPOConfig, temperature: float,
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


def _ppo_epochs(accelerator, policy, optimizer, scheduler, batch: Experience, ppo: PPOConfig, temperature: float,
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
            micros = micro_batches(batch, mb, micro, ppo.bucket_by_length)
            bad = bad_nonfinite = False
            # DeepSpeed cannot drop gradients it has already reduced part-way through an accumulation, so with
            # several micro-batches the skip decision comes first, from a forward pass without gradients.
            decide_first = deepspeed and gas > 1
            if decide_first:
                with torch.no_grad():
                    for ids in micros:
                        loss, st = micro_batch_loss(policy, batch, ids, ppo, temperature, terms)
                        bad, bad_nonfinite = agree_to_skip(accelerator, loss, st["ratio_mean"], ppo.ratio_threshold)
                        if bad:
                            break
            for i, ids in enumerate(micros):
                if bad:
                    break
                with accumulating(accelerator, policy, boundary=i == len(micros) - 1):
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

