"""Advantage estimators as pure tensor functions: GAE with decoupled lambdas, RLOO, GRPO (and Dr. GRPO), REINFORCE++.

Conventions as in `ppo_math`: ``(B, T)`` right-padded tensors, ``mask`` marks real response tokens, padded slots may
hold garbage and are 0 in every output. Group estimators see ``B = G * k`` rows where rows ``g*k .. g*k+k-1`` are the
k responses to prompt ``g`` (the rollout's order); groups never straddle ranks, so group statistics are local, while
statistics the estimator calls global go through ``reduce_fn`` (the sum of ``[sum, sum_sq, count]`` over ranks, as in
``masked_whiten``). Every output is float32 and detached: advantages and returns are constants in the PPO loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from detoxrl.train.ppo_math import (ReduceFn, _bool_mask, _masked_select_zero, _stats_dtype, gae_advantages,
                                    masked_whiten)

GROUP_STD_EPS = 1e-4  # TRL's and verl's epsilon: an all-equal group gets advantages 0, not inf
CRITIC_FREE = ("rloo", "grpo", "reinforce_pp")


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Total (undiscounted) reward of each response ``(B,)``: the score plus any per-token KL penalties."""
    return _masked_select_zero(rewards.detach(), mask).sum(dim=-1)


def _groups(x: Tensor, k: int) -> Tensor:
    if k < 1 or x.shape[0] % k:
        raise ValueError(f"{x.shape[0]} responses do not split into groups of k={k}")
    return x.reshape(-1, k)


def rloo_advantages(seq_rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out: ``A_i = R_i - mean_{j != i} R_j`` within each group of k (needs k >= 2)."""
    if k < 2:
        raise ValueError("rloo needs k >= 2 responses per prompt")
    g = _groups(seq_rewards.detach().float(), k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(seq_rewards: Tensor, k: int, scale_by_std: bool = True, eps: float = GROUP_STD_EPS) -> Tensor:
    """GRPO: ``A_i = (R_i - mean_g) / (std_g + eps)`` with the unbiased std of the group (as TRL and verl);
    ``scale_by_std=False`` is Dr. GRPO's ``R_i - mean_g``. Needs k >= 2."""
    if k < 2:
        raise ValueError("grpo needs k >= 2 responses per prompt")
    g = _groups(seq_rewards.detach().float(), k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def broadcast_to_tokens(seq_advantages: Tensor, mask: Tensor) -> Tensor:
    """A per-response advantage on every real token of that response; 0 on padding."""
    m = _bool_mask(mask)
    adv = seq_advantages.detach().float().reshape(-1, 1).expand(m.shape)
    return torch.where(m, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{s >= t} gamma^(s-t) r_s`` over each row's real tokens (the return of REINFORCE)."""
    m = _bool_mask(mask)
    r = _masked_select_zero(rewards.detach(), m)
    running = torch.zeros_like(r[..., 0])
    out: list[Tensor] = []
    for t in reversed(range(r.shape[-1])):
        running = torch.where(m[..., t], r[..., t] + gamma * running, torch.zeros_like(running))
        out.append(running)
    return torch.stack(out[::-1], dim=-1)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float,
                            reduce_fn: Optional[ReduceFn] = None) -> Tensor:
    """REINFORCE++: the per-token reward-to-go, whitened over the global batch (all ranks' real tokens)."""
    return masked_whiten(reward_to_go(rewards, mask, gamma), mask, shift_mean=True, reduce_fn=reduce_fn)


def decoupled_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam_policy: float,
                  lam_critic: float) -> tuple[Tensor, Tensor]:
    """GAE advantages with ``lam_policy`` for the policy and returns (critic targets) ``A + V`` with ``lam_critic``
    (VC-PPO: 1.0 gives the critic unbiased Monte-Carlo targets). Equal lambdas: one pass, today's GAE."""
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam_policy)
    if lam_critic != lam_policy:
        _, returns = gae_advantages(rewards, values, mask, gamma, lam_critic)
    return advantages, returns


def critic_free_advantages(estimator: str, rewards: Tensor, mask: Tensor, k: int, gamma: float,
                           group_std_scale: bool, whiten: bool, reduce_fn: Optional[ReduceFn] = None) -> Tensor:
    """Advantages ``(B, T)`` of the critic-free estimators from the per-token rewards (score on the last token, plus
    the KL penalty when it is in the reward). `whiten` (global) applies to `rloo`; `grpo` is normalised by its
    groups and `reinforce_pp` always over the global batch."""
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma, reduce_fn)
    seq = sequence_rewards(rewards, mask)
    if estimator == "rloo":
        adv = broadcast_to_tokens(rloo_advantages(seq, k), mask)
        return masked_whiten(adv, mask, shift_mean=True, reduce_fn=reduce_fn) if whiten else adv
    if estimator == "grpo":
        return broadcast_to_tokens(grpo_advantages(seq, k, group_std_scale), mask)
    raise ValueError(f"unknown critic-free estimator {estimator!r}; valid: {', '.join(CRITIC_FREE)}")


def value_clip_range(mode: str, clip: float, returns: Tensor, mask: Tensor,
                     reduce_fn: Optional[ReduceFn] = None) -> Optional[float]:
    """The clip range of the value loss: ``clip`` (absolute), ``clip x std(returns)`` over the global batch's real
    tokens (relative), or None (off). Called on every rank in `relative` mode (a collective)."""
    if mode == "off":
        return None
    if mode == "absolute":
        return clip
    if mode != "relative":
        raise ValueError(f"unknown value clip mode {mode!r}; valid: absolute, relative, off")
    m = _bool_mask(mask)
    sdt = _stats_dtype(returns.device)
    r = _masked_select_zero(returns, m).to(sdt)
    stats = torch.stack([r.sum(), (r * r).sum(), m.sum().to(sdt)])
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    total, total_sq, n = stats.double().tolist()
    mean = total / max(n, 1.0)
    var = max((total_sq - total * mean) / max(n - 1.0, 1.0), 0.0)
    return clip * var ** 0.5
