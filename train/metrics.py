"""Step 7's figures: one step's metrics from its Experience and PPO update, reduced over ranks (the names are
listed in README's "Metrics" section)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detoxrl.train.alarms import response_signals
from detoxrl.train.distributed import reduce_mean
from detoxrl.train.experience import Experience
from detoxrl.train.ppo_math import explained_variance, masked_mean
from detoxrl.train.reward import RewardModel
from detoxrl.train.tracking import distinct_n, duplicate_share
from detoxrl.train.update import LossTerms, UpdateResult

# metric -> the PPO update's per-micro-batch statistic it averages
UPDATE_MEANS = {"objective/entropy": "entropy", "ppo/loss/policy": "policy_loss", "ppo/loss/value": "value_loss",
                "ppo/loss/total": "loss", "ppo/policy/clipfrac": "clipfrac", "ppo/policy/approx_kl": "approx_kl",
                "ppo/policy/ratio_mean": "ratio_mean", "ppo/val/clipfrac": "vf_clipfrac", "ppo/grad_norm": "grad_norm"}


def mean_or_nan(values: list[float]) -> float:
    """The mean, or NaN when the update recorded none (every mini-batch skipped, no critic, no clipping...)."""
    return float(np.mean(values)) if values else float("nan")


def kl_per_response(exp: Experience) -> torch.Tensor:
    return (exp.kl * exp.mask).sum(1)


def global_kl(accelerator, exp: Experience) -> float:
    """The mean per-response KL over every rank (what the KL controller reads)."""
    return reduce_mean(accelerator, {"kl": kl_per_response(exp).mean().item()})["kl"]


def step_metrics(accelerator, exp: Experience, update: UpdateResult, terms: LossTerms, kl_coef: float,
                 reward: RewardModel, judges, judged: dict[str, torch.Tensor], reward_tox, min_new_tokens: int,
                 phase_seconds: dict[str, float], elapsed: float, lrs: list[float]) -> dict[str, float]:
    """This step's metrics, the same on every rank: per-rank figures averaged over ranks, the reward over the
    gathered global batch. `kl_coef` is the coefficient the step used (before the controller's update)."""
    world, stats, mask = accelerator.num_processes, update.stats, exp.mask
    global_scores = accelerator.gather(exp.raw_scores.to(accelerator.device)).float()
    means = {name: mean_or_nan(stats[key]) for name, key in UPDATE_MEANS.items()}
    adv_mean = masked_mean(exp.advantages, mask)
    lengths = exp.lengths
    local: dict[str, Any] = {
        "objective/kl": kl_per_response(exp).mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": means.pop("objective/entropy"),
        "objective/score_normalized_mean": exp.scores.mean().item(),
        **means,
        "ppo/val/explained_variance": explained_variance(exp.old_values, exp.returns, mask).item()
        if terms.value else float("nan"),
        "ppo/advantages_mean": adv_mean.item(),
        "ppo/advantages_std": masked_mean((exp.advantages - adv_mean) ** 2, mask).sqrt().item(),
        "ppo/skipped_minibatches": float(update.skipped),
        "env/response_length_mean": lengths.float().mean().item(),
        "env/response_ended_share": exp.ended.float().mean().item(),
        # reward hacking shows as falling distinct-n / rising duplicates next to a climbing KL
        "env/distinct_2": distinct_n(exp.responses, 2) or 0.0,
        "env/duplicate_share": duplicate_share(exp.responses),
        **response_signals(exp.responses, lengths.tolist(), min_new_tokens, judged,
                           {j.name: j.cfg.threshold for j in judges}, reward_tox),
        "perf/samples_per_s": exp.response_ids.shape[0] * world / elapsed,
        "perf/tokens_per_s": mask.sum().item() * world / elapsed,
        **phase_seconds,
        "time/step": elapsed,
    }
    if terms.kl_coef > 0:
        local["ppo/loss/kl"] = mean_or_nan(stats["kl_loss"])
    for t, s in zip(reward.terms, exp.term_scores):
        local[f"env/reward_term/{t.name}/{t.cfg.label}"] = s.mean().item()
    metrics = reduce_mean(accelerator, local)
    metrics["env/reward_mean"] = global_scores.mean().item()
    metrics["env/reward_std"] = global_scores.std().item() if global_scores.numel() > 1 else 0.0
    metrics["lr"] = lrs[0]
    if len(lrs) > 1:  # the critic's own parameter group (critic.lr)
        metrics["lr/critic"] = lrs[1]
    return metrics
