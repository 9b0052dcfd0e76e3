"""Pure tensor math for PPO-based RLHF: masked statistics, KL penalties, GAE, losses.

Conventions
-----------
* ``B`` = batch, ``T`` = response length (right-padded).
* ``mask`` is a float or bool tensor ``(B, T)``; any non-zero entry marks a real
  response token (EOS included), zeros mark padding after the response.
* Padded slots may hold arbitrary garbage (huge numbers, ``inf``, ``nan``): every
  function selects with ``torch.where`` instead of multiplying by the mask, because
  ``inf * 0 = nan`` would otherwise leak into sums and gradients.
* Statistics are computed in float32 (bf16/fp16 inputs are upcast; float64 stays
  float64) because bf16 has only ~3 significant digits, which is far too coarse for
  log-ratios, variances and means over thousands of tokens.
* No global state: KL controllers and reward moments are explicit objects with
  ``state_dict``/``load_state_dict`` so the trainer can checkpoint them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_estimate",
    "KL_ESTIMATORS",
    "per_token_rewards",
    "gae_advantages",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "loss_denominator",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "RunningMoments",
    "normalize_and_clip",
    "FixedKLController",
    "AdaptiveKLController",
]

ReduceFn = Callable[[Tensor], Tensor]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs")


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _f32(x: Tensor) -> Tensor:
    """Upcast half/bf16/int/bool to float32; keep float32/float64 as they are (no copy)."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _bool_mask(mask: Tensor) -> Tensor:
    """Any non-zero entry is a real token; bool lets us use ``torch.where``."""
    return mask if mask.dtype == torch.bool else mask != 0


def _stats_dtype(device: torch.device) -> torch.dtype:
    # The [sum, sum_sq, count] formulation of the variance suffers from cancellation
    # (sum_sq - sum^2/n); float64 makes that harmless. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _masked_select_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (upcast) with padded slots replaced by exact zeros (also kills inf/nan garbage)."""
    xf = _f32(x)
    return torch.where(_bool_mask(mask), xf, torch.zeros((), dtype=xf.dtype, device=xf.device))


# ---------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` over real tokens (float32 or wider), over all elements or along ``dim``."""
    xs = _masked_select_zero(x, mask)
    return xs.sum() if dim is None else xs.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over real tokens.

    An empty selection (all-zero mask, or an all-zero row when ``dim`` is given) yields
    0 rather than nan: this function feeds losses, and a nan loss would poison the
    optimizer state, whereas 0 simply contributes no gradient.
    """
    m = _bool_mask(mask)
    total = masked_sum(x, m, dim)
    count = m.expand_as(x).sum() if dim is None else m.expand_as(x).sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real tokens (scalar).

    Two-pass (mean first, then centred squares) for numerical stability. Returns nan
    when the variance is undefined: no real tokens, or a single one with ``unbiased``.
    """
    m = _bool_mask(mask).expand_as(x)
    mean = masked_mean(x, m)
    centred = _masked_select_zero(_f32(x) - mean, m)
    n = m.sum().to(centred.dtype)
    ddof = 1.0 if unbiased else 0.0
    var = (centred * centred).sum() / (n - ddof).clamp(min=1)
    return torch.where(n > ddof, var, torch.full_like(var, float("nan")))


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    reduce_fn: ReduceFn | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Normalise ``x`` to zero mean / unit variance over real tokens.

    ``reduce_fn`` (e.g. ``lambda t: accelerator.reduce(t, "sum")``) receives the 1-D tensor
    ``[sum, sum_sq, count]`` and must return its sum across data-parallel ranks, so every
    rank whitens with *global*-batch statistics (otherwise per-rank advantage scales
    differ and the effective learning rate depends on the shard). It is called on every
    rank unconditionally, even if the local mask is empty, so collectives never deadlock.

    The variance is unbiased (``count / (count - 1)``) like TRL. With ``shift_mean=False``
    the mean is added back (only the scale is normalised). Padded positions of the result
    are 0. With fewer than two real tokens the variance is taken as 0 (no nan).
    Returns float32 (float64 for float64 input).
    """
    m = _bool_mask(mask).expand_as(x)
    xf = _f32(x)
    sdt = _stats_dtype(xf.device)
    xs = torch.where(m, xf, torch.zeros((), dtype=xf.dtype, device=xf.device)).to(sdt)
    stats = torch.stack([xs.sum(), (xs * xs).sum(), m.sum().to(sdt)])
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    total, total_sq, n = stats.to(sdt).unbind()
    mean = total / n.clamp(min=1)
    # sum((x - mean)^2) = sum_sq - sum * mean; clamp guards tiny negative round-off.
    var = ((total_sq - total * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    mean_c = mean.to(xf.dtype)
    whitened = (xf - mean_c) * torch.rsqrt(var + eps).to(xf.dtype)
    if not shift_mean:
        whitened = whitened + mean_c
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ---------------------------------------------------------------------------
# KL penalty and rewards
# ---------------------------------------------------------------------------


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from log-probs of the *sampled* tokens.

    ``k1``: ``logp - ref`` (unbiased, can be negative); ``k2``: ``0.5 (logp - ref)^2``;
    ``k3``: ``(exp(ref - logp) - 1) - (ref - logp)`` (unbiased, always >= 0; Schulman's
    estimator); ``abs``: ``|logp - ref|``. Computed in float32; no masking.
    """
    diff = _f32(logp) - _f32(ref_logp)
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        r = -diff  # log(ref / policy)
        # expm1 keeps precision when the policy is close to the reference (r ~ 0).
        return torch.expm1(r) - r
    if estimator == "abs":
        return diff.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Build the dense reward ``(B, T)``: a KL penalty on every token plus the score at the end.

    ``rewards = -kl_coef * kl`` on real tokens, and ``scores[b]`` is added on the last real
    token of row ``b`` (index ``mask[b].sum() - 1``; assumes right padding). Padded slots
    are 0. A row with an all-zero mask gets no score at all (nothing is written at index
    -1). Returns ``(rewards, kl)``, both float32 and detached: rewards are constants in PPO.
    """
    m = _bool_mask(mask)
    kl = _masked_select_zero(kl_estimate(logp.detach(), ref_logp.detach(), estimator), m)
    rewards = -kl_coef * kl
    scores_f = _f32(scores.detach()).reshape(-1).to(rewards.dtype)
    if scores_f.numel() != rewards.shape[0]:
        raise ValueError(f"scores has {scores_f.numel()} elements, expected one per row ({rewards.shape[0]})")
    lengths = m.sum(dim=-1)
    last = (lengths - 1).clamp(min=0)  # row with no tokens points at 0 but adds 0 there
    bonus = torch.where(lengths > 0, scores_f, torch.zeros_like(scores_f))
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), bonus.unsqueeze(-1))
    return rewards, kl


# ---------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over right-padded rows. Returns ``(advantages, returns)``.

    Backward recursion ``A_t = delta_t + gamma * lam * A_{t+1}`` with
    ``delta_t = r_t + gamma * V_{t+1} - V_t``. The value after the last real token is 0
    (the episode ends at EOS), which holds per row regardless of length because padded
    values are zeroed before use and the recursion is reset on padded positions.
    ``returns = advantages + values``. Both outputs are float32, detached (they are
    regression/advantage targets) and 0 on padded positions.
    """
    m = _bool_mask(mask)
    r = _masked_select_zero(rewards.detach(), m)
    v = _masked_select_zero(values.detach(), m)
    T = r.shape[-1]
    zero = torch.zeros_like(r[..., 0])
    last_gae = zero
    rev: list[Tensor] = []
    for t in reversed(range(T)):
        next_v = v[..., t + 1] if t + 1 < T else zero  # already 0 past a row's end
        delta = r[..., t] + gamma * next_v - v[..., t]
        # Resetting to 0 on padding keeps padded steps from leaking into the last real token.
        last_gae = torch.where(m[..., t], delta + gamma * lam * last_gae, zero)
        rev.append(last_gae)
    advantages = torch.stack(rev[::-1], dim=-1)
    returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------


LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "token_sum_norm")


def loss_denominator(mask: Tensor, aggregation: str = "token_mean", constant: float | None = None) -> Tensor:
    """What ``aggregate_loss`` divides by for these rows: real tokens (``token_mean``), rows
    (``seq_mean_token_mean``) or rows x ``constant`` (``token_sum_norm``). Summed over micro-batches and ranks it
    is the global mini-batch's denominator: a micro-batch's share of the global loss is
    ``aggregate_loss(x) * loss_denominator(local) / loss_denominator(global)``. float64 scalar."""
    m = _bool_mask(mask)
    if aggregation == "token_mean":
        return m.sum().double()
    rows = torch.tensor(float(m.shape[0]), dtype=torch.float64, device=m.device)
    if aggregation == "seq_mean_token_mean":
        return rows
    if aggregation == "token_sum_norm":
        if constant is None or constant <= 0:
            raise ValueError(f"token_sum_norm needs a constant > 0, got {constant}")
        return rows * float(constant)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def aggregate_loss(x: Tensor, mask: Tensor, aggregation: str = "token_mean", constant: float | None = None) -> Tensor:
    """Per-token losses ``(B, T)`` -> a scalar: ``token_mean`` = sum / tokens; ``seq_mean_token_mean`` = mean over
    rows of each row's token mean (an empty row counts as 0); ``token_sum_norm`` = sum / (rows x ``constant``)
    (Dr. GRPO: no length normalisation per response). 0 when there is nothing to average."""
    if aggregation == "token_mean":
        return masked_mean(x, mask)
    denom = loss_denominator(mask, aggregation, constant)
    if aggregation == "seq_mean_token_mean":
        total = masked_mean(x, mask, dim=-1).sum()
    else:
        total = masked_sum(x, mask)
    return total / denom.clamp(min=1).to(total.dtype)


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
    aggregation: str = "token_mean", constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (to minimise), aggregated over real tokens (``aggregate_loss``; default mean).

    ``loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))`` with
    ``ratio = exp(logp - old_logp)``. Gradients flow only into ``logp``. Stats (detached):
    ``clipfrac`` (share of tokens where the clipped term is strictly larger, i.e. active),
    ``approx_kl`` (``masked_mean(0.5 * (logp - old_logp)^2)``), ``ratio_mean``,
    ``ratio_max`` (0 if there are no real tokens).
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _bool_mask(mask)
    # Zero the log-ratio on padding *before* exp: garbage there would overflow to inf and
    # its 0-weighted gradient would still become nan (inf * 0).
    log_ratio = _masked_select_zero(logp, m) - _masked_select_zero(old_logp.detach(), m)
    adv = _masked_select_zero(advantages.detach(), m)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate_loss(torch.maximum(pg_unclipped, pg_clipped), m, aggregation, constant)
    with torch.no_grad():
        ratio_d = ratio.detach()
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio.detach().square(), m),
            "ratio_mean": masked_mean(ratio_d, m),
            # ratio > 0 everywhere, so filling padding with 0 never wins the max.
            "ratio_max": torch.where(m, ratio_d, torch.zeros_like(ratio_d)).amax(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None,
    aggregation: str = "token_mean", constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Value-head regression loss (to minimise), optionally clipped around ``old_values``.

    Clipped: ``v_clip = old + clamp(v - old, -c, c)``,
    ``loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))``. With ``clip_range=None``:
    ``0.5 * masked_mean((v - R)^2)``. Stat ``vf_clipfrac``: share of tokens where the
    clipped term is strictly larger (0 when unclipped). ``aggregation`` replaces the mean
    (``aggregate_loss``).
    """
    m = _bool_mask(mask)
    v = _masked_select_zero(values, m)
    old = _masked_select_zero(old_values.detach(), m)
    ret = _masked_select_zero(returns.detach(), m)
    loss_unclipped = (v - ret).square()
    if clip_range is None:
        loss = 0.5 * aggregate_loss(loss_unclipped, m, aggregation, constant)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=loss.dtype, device=loss.device)}
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0 or None, got {clip_range}")
    v_clipped = old + torch.clamp(v - old, -clip_range, clip_range)
    loss_clipped = (v_clipped - ret).square()
    loss = 0.5 * aggregate_loss(torch.maximum(loss_unclipped, loss_clipped), m, aggregation, constant)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), m)
    return loss, {"vf_clipfrac": clipfrac}


# ---------------------------------------------------------------------------
# logits helpers
# ---------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``(..., V) -> (...)``, float32.

    Uses ``logsumexp - sum(softmax * logits)``, which never takes ``log`` of a
    probability. ``-inf`` logits (e.g. banned tokens) are clamped to the most negative
    finite float first so that ``0 * -inf`` cannot produce nan, forward or backward.
    """
    x = _f32(logits)
    x = x.clamp(min=torch.finfo(x.dtype).min)
    probs = torch.softmax(x, dim=-1)
    return torch.logsumexp(x, dim=-1) - (probs * x).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``labels``: ``(..., V), (...) -> (...)``.

    Computed as ``logit[label] - logsumexp(logits)`` in float32, so no full ``(..., V)``
    log-softmax tensor is materialised; at most one float32 copy of the logits exists
    (none for float32 input with ``temperature == 1``). ``labels`` must be valid token ids
    everywhere (use the pad id, not -100, on padded positions; mask the result later).
    Temperature must match the one used for sampling, or ratios are biased.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = _f32(logits)
    if temperature != 1.0:
        x = x / temperature  # out-of-place: never mutate the caller's tensor
    picked = x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens (0-dim float32, detached).

    1 = perfect value head, 0 = no better than a constant, < 0 = worse. When
    ``Var(returns) == 0`` (or fewer than one real token) the ratio is undefined and
    ``nan`` is returned, like TRL; callers should log it and not branch on it.
    """
    with torch.no_grad():
        m = _bool_mask(mask)
        ret = _masked_select_zero(returns, m)
        diff = ret - _masked_select_zero(values, m)
        var_ret = masked_var(ret, m, unbiased=False)  # the Bessel factor cancels in the ratio
        var_diff = masked_var(diff, m, unbiased=False)
        ev = 1.0 - var_diff / var_ret
        return torch.where(var_ret > 0, ev, torch.full_like(ev, float("nan")))


# ---------------------------------------------------------------------------
# reward normalisation
# ---------------------------------------------------------------------------


class RunningMoments:
    """Running mean / std of rewards across updates (Chan et al. parallel variance merge).

    Starts empty (``count = 0``, ``mean = 0``, ``std = 1``), so normalising before the
    first update is the identity. ``std`` is the unbiased running standard deviation.
    Statistics are accumulated as Python floats (float64).
    """

    def __init__(self) -> None:
        self.mean: float = 0.0
        self.var: float = 1.0  # population variance of everything seen so far
        self.std: float = 1.0  # unbiased std, derived from var and count
        self.count: float = 0.0

    def update(self, x: Tensor, reduce_fn: ReduceFn | None = None) -> tuple[float, float]:
        """Fold batch ``x`` (any shape) into the running moments; return its ``(mean, std)``.

        ``reduce_fn`` sums ``[sum, sum_sq, count]`` across ranks (as in ``masked_whiten``)
        so all ranks hold identical moments. The returned batch std is unbiased
        (0.0 for a single element). Raises ``ValueError`` on an empty (global) batch.
        """
        xd = x.detach()
        sdt = _stats_dtype(xd.device)
        flat = xd.reshape(-1).to(sdt)
        stats = torch.stack([flat.sum(), flat.square().sum(), torch.tensor(float(flat.numel()), dtype=sdt, device=flat.device)])
        if reduce_fn is not None:
            stats = reduce_fn(stats)
        total, total_sq, n = (float(v) for v in stats.tolist())
        if n <= 0:
            raise ValueError("RunningMoments.update got an empty batch")
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean * batch_mean, 0.0)  # population variance

        # Chan et al.: merge (count, mean, M2) pairs; M2 = var * count.
        delta = batch_mean - self.mean
        tot = self.count + n
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot
        self.std = math.sqrt(self.var * tot / (tot - 1)) if tot > 1 else math.sqrt(self.var)

        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean = float(d["mean"])
        self.var = float(d["var"])
        self.count = float(d["count"])
        if "std" in d:
            self.std = float(d["std"])
        else:
            self.std = math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else math.sqrt(self.var)


def normalize_and_clip(scores: Tensor, moments: RunningMoments | None, clip: float | None,
                       shift_mean: bool = True) -> Tensor:
    """``(scores - mean) / max(std, 1e-8)`` if ``moments`` is given (``scores / max(std, 1e-8)`` with
    ``shift_mean=False``: scaled, not shifted), then clamp to ``[-clip, clip]``.

    Does not update ``moments`` (the caller decides when). ``clip`` of ``None`` or ``0``
    disables clipping; a negative ``clip`` is an error. Returns float32 (or float64).
    """
    out = _f32(scores)
    if moments is not None:
        out = ((out - moments.mean) if shift_mean else out) / max(moments.std, 1e-8)
    if clip is not None and clip < 0:
        raise ValueError(f"clip must be > 0, 0 or None, got {clip}")
    if clip:
        out = out.clamp(-clip, clip)
    return out


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (same interface as the adaptive one)."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(d, self.kind)
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as in TRL).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    The coefficient grows when the policy drifts further than ``target`` from the
    reference and shrinks when it stays closer; the clip bounds the per-update change.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.init_kl_coef = float(init_kl_coef)
        self.value: float = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust ``value`` given the observed (mean, per-sequence) KL and samples seen."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "value": self.value,
            "init_kl_coef": self.init_kl_coef,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore ``value``. Config (target/horizon) stays as constructed; a mismatch only
        warns, since changing the target on resume can be deliberate."""
        _check_kind(d, self.kind)
        for key in ("target", "horizon"):
            if key in d and float(d[key]) != getattr(self, key):
                warnings.warn(
                    f"AdaptiveKLController checkpoint {key}={d[key]} differs from configured "
                    f"{getattr(self, key)}; keeping the configured value",
                    stacklevel=2,
                )
        self.value = float(d["value"])


def _check_kind(d: dict[str, Any], kind: str) -> None:
    # Loading a fixed-controller checkpoint into an adaptive controller (or vice versa)
    # is a config error that would silently change training dynamics.
    got = d.get("type", kind)
    if got != kind:
        raise ValueError(f"KL controller state is of type {got!r}, expected {kind!r}")
