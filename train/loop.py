"""The PPO training loop. Reads top to bottom; each step of one PPO iteration is numbered as in DESIGN.md.

    setup: accelerator, data, models (policy + value head, reference, reward), optimizer, resume
    for each step:
        1. prompts      this rank's shard of the shuffled prompt set
        2. rollout      batched sampling from the policy (LoRA on)
        3. reward       decode, re-tokenize for each classifier, score in length-sorted batches
        4. reference    log-probs under the frozen reference; old log-probs and values under the policy
        5. advantages   per-token -beta*KL + score on the last token; GAE; whitening over the global batch
        6. PPO epochs   clipped policy + value losses over shuffled mini-batches with gradient accumulation
        7. bookkeeping  KL controller, metrics (reduced over ranks), samples, checkpoint
    finish: final adapter + value head, before/after evaluation
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from detoxrl.train import assets, checkpoint as ckpt
from detoxrl.train.config import Config, config_hash, to_dict, to_yaml
from detoxrl.train.data import PromptSampler, build_prompts, load_rows
from detoxrl.train.models import (Rollout, build_policy, build_reference_copy, context_window, count_parameters,
                                  detect_kind, generate_rollouts, load_tokenizer, reference_logprobs, resolve_device,
                                  resolve_dtype)
from detoxrl.train.ppo_math import (AdaptiveKLController, FixedKLController, RunningMoments, entropy_from_logits,
                                    explained_variance, gae_advantages, logprobs_from_logits, masked_mean,
                                    masked_whiten, normalize_and_clip, per_token_rewards, policy_loss, value_loss)
from detoxrl.train.reward import RewardModel, build_reward
from detoxrl.train.tracking import RunLogger, package_versions, setup_logging, write_json

log = logging.getLogger("detoxrl.train")


class NonFiniteLossError(RuntimeError):
    """Too many PPO steps in a row produced a NaN/inf loss."""


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    final_dir: Optional[Path]
    metrics: list[dict[str, float]]           # metrics of the steps run in this process (main process only)
    evaluation: Optional[dict[str, Any]]      # before/after held-out figures when evaluation.before_after
    policy: Any = None                        # the trained PolicyWithValue (unwrapped), for in-process callers


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # gloo on CPU: without it accelerate reports a single process for multi-CPU runs (see DESIGN.md). Only when
    # launched with several processes: an explicit backend in a plain single process makes accelerate fail.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    return Accelerator(cpu=cfg.run.device == "cpu", kwargs_handlers=handlers)


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


def forward_in_chunks(policy, rollout: Rollout, chunk: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs and values (B, T) of the sampled responses, without gradients."""
    logps, values = [], []
    with torch.no_grad():
        for s in range(0, rollout.response_ids.shape[0], chunk):
            sl = slice(s, s + chunk)
            logits, v = policy(rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.response_ids[sl])
            logps.append(logprobs_from_logits(logits, rollout.response_ids[sl], temperature).float())
            values.append(v.float())
    return torch.cat(logps), torch.cat(values)


def heldout_evaluation(policy, tokenizer, prompts: list[list[int]], prompt_texts: list[str], reward: RewardModel,
                       cfg: Config, device: torch.device) -> dict[str, Any]:
    """Mean toxicity and reward of held-out responses, sampled with a fixed seed (does not disturb training RNG)."""
    term = reward.terms[cfg.evaluation.term]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed + 12345)
        rollout = generate_rollouts(policy, prompts, tokenizer, cfg.generation, cfg.generation.max_new_tokens, device)
    responses = decode_responses(tokenizer, rollout)
    toxicity = term.label_probability(responses, cfg.evaluation.toxic_label)
    total, _ = reward.score(prompt_texts, responses)
    return {"toxicity_mean": toxicity.mean().item(), "toxicity_std": toxicity.std().item() if len(responses) > 1
            else 0.0, "reward_mean": total.mean().item(), "num_samples": len(responses),
            "samples": [{"prompt": p, "response": r, "toxicity": t}
                        for p, r, t in zip(prompt_texts[:8], responses[:8], toxicity[:8].tolist())]}


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def train(cfg: Config) -> RunResult:
    # ---- setup --------------------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
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

    with accelerator.main_process_first():  # rank 0 builds the demo assets / downloads; others then read the cache
        policy_path = assets.resolve(cfg.policy.model, "policy")
        data_path = assets.resolve(cfg.data.dataset, "data")
        kind = detect_kind(policy_path, cfg.policy.kind, cfg.policy.revision, cfg.policy.trust_remote_code)
        tokenizer = load_tokenizer(policy_path, kind, cfg.policy.revision, cfg.policy.trust_remote_code)
        train_rows = load_rows(data_path, cfg.data.split)
        eval_rows = load_rows(data_path, cfg.evaluation.split) if cfg.evaluation.before_after else None
    prompts = build_prompts(train_rows, cfg.data, tokenizer, kind, cfg.run.seed)
    sampler = PromptSampler(len(prompts), cfg.ppo.batch_size, rank, world, cfg.run.seed)
    log.info("%d training prompts (%s, split %s), %d process(es), global batch %d", len(prompts), cfg.data.dataset,
             cfg.data.split, world, cfg.ppo.batch_size * world)

    dtype = resolve_dtype(cfg.policy.dtype, device)
    shared_ref = cfg.reference.mode == "shared"
    policy = build_policy(cfg.policy, policy_path, kind, device, dtype, shared_ref, cfg.run.seed)
    window = context_window(policy.lm.config) if kind == "causal" else None
    max_new = max(cfg.generation.max_new_tokens, (cfg.generation.max_new_tokens_range or [0, 0])[1])
    longest_prompt = max(len(p) for p in prompts.input_ids)
    if window is not None and longest_prompt + max_new > window:
        raise ValueError(f"prompt ({longest_prompt} tokens) + response ({max_new} tokens) exceeds the model's "
                         f"window of {window}; lower data.max_prompt_tokens or generation.max_new_tokens")
    reference = None if shared_ref else build_reference_copy(
        cfg.policy, cfg.reference, policy_path, kind, resolve_device(cfg.reference.device, device), dtype)
    reward = build_reward(cfg.reward.terms, lambda name, role: assets.resolve(name, role), device)
    total_params, trainable_params = count_parameters(policy)
    log.info("policy %s (%s, %s): %s parameters, %s trainable (%.3f%%)", cfg.policy.model, kind, dtype,
             f"{total_params:,}", f"{trainable_params:,}", 100.0 * trainable_params / total_params)

    from transformers import get_scheduler
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas), eps=cfg.optim.adam_eps,
                                  weight_decay=cfg.optim.weight_decay)
    minibatches = cfg.ppo.batch_size // cfg.ppo.mini_batch_size
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.run.total_steps * cfg.ppo.ppo_epochs * minibatches)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)

    kl_ctl = (AdaptiveKLController(cfg.ppo.kl.init_coef, cfg.ppo.kl.target, cfg.ppo.kl.horizon) if cfg.ppo.kl.adaptive
              else FixedKLController(cfg.ppo.kl.init_coef))
    moments = RunningMoments() if cfg.reward.normalize else None
    start_step, samples_seen, nonfinite_in_row, evaluation = 0, 0, 0, {}

    # ---- resume ---------------------------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    resume_from = ckpt.find_resume_checkpoint(ckpt_root, cfg.checkpoint.resume, is_main)
    accelerator.wait_for_everyone()
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        diff = ckpt.config_differences(state["config"], to_dict(cfg))
        if diff and not cfg.checkpoint.allow_config_change:
            raise ValueError(f"refusing to resume from {resume_from}: the config changed in keys that alter the "
                             f"run: {', '.join(diff)}. Set checkpoint.allow_config_change=true to force it, or "
                             f"checkpoint.resume=never with a new run.output_dir.")
        state = ckpt.load_checkpoint(resume_from, accelerator, policy, optimizer, scheduler)
        start_step, samples_seen = state["step"], state["samples_seen"]
        sampler.load_state_dict(state["sampler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if moments is not None and state.get("reward_moments"):
            moments.load_state_dict(state["reward_moments"])
        evaluation = state.get("evaluation", {})
        log.info("resumed from %s at step %d (%d samples seen)", resume_from, start_step, samples_seen)
    if start_step >= cfg.run.total_steps:
        log.info("nothing to do: already at step %d of %d", start_step, cfg.run.total_steps)

    if is_main:
        write_json(out / "run_info.json", {
            "world_size": world, "distributed_type": str(accelerator.distributed_type),
            "zero_stage": None, "mixed_precision": accelerator.mixed_precision, "policy_kind": kind,
            "policy_dtype": str(dtype), "devices": {
                "policy": str(device), "reference": str(reference.device) if reference else f"{device} (shared base)",
                "reward": {t.name: str(t.device) for t in reward.terms}},
            "parameters": {"total": total_params, "trainable": trainable_params},
            "packages": package_versions(), "config_hash": config_hash(cfg),
            "resumed_from": str(resume_from) if resume_from else None})

    eval_prompts = eval_texts = None
    if cfg.evaluation.before_after:
        held = build_prompts(eval_rows, cfg.data, tokenizer, kind, cfg.run.seed)
        n = min(cfg.evaluation.num_samples, len(held))
        eval_prompts, eval_texts = held.input_ids[:n], held.texts[:n]
        if "before" not in evaluation:
            evaluation["before"] = heldout_evaluation(unwrapped, tokenizer, eval_prompts, eval_texts, reward, cfg,
                                                      device)
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
    micro = cfg.ppo.mini_batch_size // cfg.ppo.gradient_accumulation_steps

    def save(step_done: int) -> Path:
        state = {"step": step_done, "samples_seen": samples_seen, "sampler": sampler.state_dict(),
                 "kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict() if moments else None,
                 "evaluation": evaluation, "world_size": world, "config": to_dict(cfg),
                 "config_hash": config_hash(cfg), "packages": package_versions()}
        return ckpt.save_checkpoint(accelerator, policy, optimizer, scheduler, state, ckpt_root, step_done,
                                    cfg.checkpoint.keep_last)

    try:
        for step in range(start_step, cfg.run.total_steps):
            timer = PhaseTimer(device)
            t_step = time.perf_counter()

            # 1. prompts: this rank's shard of the global batch
            idx = sampler.next_indices()
            batch_prompts = [prompts.input_ids[i] for i in idx]
            batch_texts = [prompts.texts[i] for i in idx]

            # 2. rollout: batched sampling, chunked by generation.rollout_batch_size
            with timer("time/generate"):
                rollout = generate_rollouts(unwrapped, batch_prompts, tokenizer, cfg.generation,
                                            draw_max_new_tokens(cfg, step), device)
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
                scores = normalize_and_clip(scores, moments, cfg.reward.clip).to(device)

            # 4. reference log-probs (frozen starting policy), then old log-probs and values of the policy
            with timer("time/reference"):
                ref_logp = reference_logprobs(unwrapped, reference, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.response_ids, temp)
            with timer("time/old_logprobs"):
                old_logp, old_values = forward_in_chunks(policy, rollout, cfg.generation.rollout_batch_size, temp)

            # 5. advantages: -beta*KL per token + score on the last token; GAE; whitening over the global batch
            rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, kl_ctl.value, cfg.ppo.kl.estimator)
            advantages, returns = gae_advantages(rewards, old_values, mask, cfg.ppo.gamma, cfg.ppo.lam)
            if cfg.ppo.whiten_advantages:
                advantages = masked_whiten(advantages, mask, shift_mean=True, reduce_fn=reduce_fn)

            # 6. PPO epochs over shuffled mini-batches; micro-batches accumulate gradients
            stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "loss", "entropy",
                                                              "clipfrac", "approx_kl", "vf_clipfrac", "ratio_mean")}
            skipped = nonfinite = 0
            shuffle = torch.Generator().manual_seed(cfg.run.seed * 100003 + step)  # same on every rank
            with timer("time/ppo_update"):
                for _ in range(cfg.ppo.ppo_epochs):
                    order = torch.randperm(cfg.ppo.batch_size, generator=shuffle).to(device)
                    for mb_start in range(0, cfg.ppo.batch_size, cfg.ppo.mini_batch_size):
                        mb = order[mb_start:mb_start + cfg.ppo.mini_batch_size]
                        bad = False
                        for mi, m_start in enumerate(range(0, len(mb), micro)):
                            ids = mb[m_start:m_start + micro]
                            m = mask[ids]
                            last = mi == cfg.ppo.gradient_accumulation_steps - 1
                            # no gradient all-reduce until the mini-batch's last micro-batch
                            sync = accelerator.no_sync(policy) if not last else _null()
                            with sync:
                                logits, values = policy(rollout.prompt_ids[ids], rollout.prompt_mask[ids],
                                                        rollout.response_ids[ids])
                                logp = logprobs_from_logits(logits, rollout.response_ids[ids], temp).float()
                                pg_loss, pg_stats = policy_loss(logp, old_logp[ids], advantages[ids], m,
                                                                cfg.ppo.clip_range)
                                vf_loss, vf_stats = value_loss(values.float(), old_values[ids], returns[ids], m,
                                                               cfg.ppo.value_clip_range)
                                entropy = masked_mean(entropy_from_logits(logits.float()), m)
                                loss = pg_loss + cfg.ppo.vf_coef * vf_loss - cfg.ppo.entropy_coef * entropy
                                is_nonfinite = not torch.isfinite(loss).item()
                                too_far = pg_stats["ratio_mean"].item() > cfg.ppo.ratio_threshold
                                if any_rank(accelerator, is_nonfinite or too_far):
                                    nonfinite += int(any_rank(accelerator, is_nonfinite))
                                    bad = True
                                    break
                                accelerator.backward(loss / cfg.ppo.gradient_accumulation_steps)
                            for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("loss", loss),
                                         ("entropy", entropy), ("clipfrac", pg_stats["clipfrac"]),
                                         ("approx_kl", pg_stats["approx_kl"]), ("vf_clipfrac", vf_stats["vf_clipfrac"]),
                                         ("ratio_mean", pg_stats["ratio_mean"])):
                                stats[k].append(float(v.detach()))
                        if bad:  # skip the whole mini-batch on every rank
                            optimizer.zero_grad(set_to_none=True)
                            skipped += 1
                            continue
                        if cfg.ppo.max_grad_norm is not None:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)

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
                "env/reward_std": 0.0,  # replaced with the global value below
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
                "ppo/val/explained_variance": explained_variance(old_values, returns, mask).item(),
                "ppo/advantages_mean": masked_mean(advantages, mask).item(),
                "ppo/advantages_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
                "ppo/skipped_minibatches": float(skipped),
                "env/response_length_mean": rollout.response_mask.sum(1).float().mean().item(),
                "env/response_ended_share": rollout.ended.float().mean().item(),
                "perf/samples_per_s": len(idx) * world / elapsed,
                "perf/tokens_per_s": n_tokens * world / elapsed,
                **{k: v for k, v in timer.seconds.items()},
                "time/step": elapsed,
            }
            for t, s in zip(reward.terms, term_scores):
                local[f"env/reward_term/{t.name}/{t.cfg.label}"] = s.mean().item()
            metrics = reduce_mean(accelerator, local)
            metrics["env/reward_mean"] = global_scores.mean().item()
            metrics["env/reward_std"] = global_scores.std().item() if global_scores.numel() > 1 else 0.0
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["perf/samples_per_s"] *= 1.0  # already global (per-rank rate x world, averaged)
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == cfg.run.total_steps:
                logger.scalars(done, metrics)
            if cfg.logging.sample_every and done % cfg.logging.sample_every == 0:
                logger.samples(done, [{"prompt": p[-200:], "response": r, "reward": float(s)} for p, r, s in
                                      zip(batch_texts, responses, raw_scores.tolist())][:cfg.logging.num_samples])
            logger.progress(done, metrics["env/reward_mean"], metrics["objective/kl"])
            history.append({"step": done, **metrics})
            if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < cfg.run.total_steps:
                save(done)
    finally:
        logger.close()

    # ---- finish: final adapter + value head, checkpoint, before/after ------------------------------------------
    steps_done = max(start_step, cfg.run.total_steps)
    if cfg.checkpoint.every_steps:
        save(steps_done)
    final_dir = out / "final"
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
    if cfg.evaluation.before_after:
        evaluation["after"] = heldout_evaluation(unwrapped, tokenizer, eval_prompts, eval_texts, reward, cfg, device)
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
    return RunResult(out, steps_done, final_dir, history, evaluation or None, unwrapped)


@contextmanager
def _null():
    yield
