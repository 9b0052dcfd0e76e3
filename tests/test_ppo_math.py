"""Tests for detoxrl.train.ppo_math and detoxrl.train.advantages against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from detoxrl.train.advantages import (
    broadcast_to_tokens,
    critic_free_advantages,
    decoupled_gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
    sequence_rewards,
    value_clip_range,
)
from detoxrl.train.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_estimate,
    logprobs_from_logits,
    loss_denominator,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    normalize_and_clip,
    per_token_rewards,
    policy_loss,
    value_loss,
)

BIG = 1e6
INF = float("inf")


def close(actual, expected, atol=1e-5):
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_t, atol=atol, rtol=1e-5)


# Real tokens 1,2,3 | 4,5; garbage (huge / inf / nan) in padded slots must not leak.
X = torch.tensor([[1.0, 2.0, 3.0, BIG], [4.0, 5.0, INF, float("nan")]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


# ---------------------------------------------------------------- masked stats


def test_masked_sum_and_mean_ignore_padding():
    close(masked_sum(X, M), 15.0)  # 1+2+3+4+5
    close(masked_mean(X, M), 3.0)  # 15 / 5
    close(masked_sum(X, M, dim=1), [6.0, 9.0])
    close(masked_mean(X, M, dim=1), [2.0, 4.5])  # 6/3, 9/2
    # column 3 has no real token -> mean 0 (documented), not nan
    close(masked_mean(X, M, dim=0), [2.5, 3.5, 3.0, 0.0])
    # bool mask gives the same result
    close(masked_mean(X, M.bool()), 3.0)


def test_masked_var():
    # values 1..5, mean 3, sum of squared deviations 4+1+0+1+4 = 10
    close(masked_var(X, M), 2.5)  # 10 / (5-1)
    close(masked_var(X, M, unbiased=False), 2.0)  # 10 / 5
    one = torch.tensor([[7.0, BIG]])
    assert torch.isnan(masked_var(one, torch.tensor([[1, 0]]), unbiased=True))
    close(masked_var(one, torch.tensor([[1, 0]]), unbiased=False), 0.0)


def test_masked_whiten_hand_values():
    # (x - 3) / sqrt(2.5) = [-2,-1,0,1,2] / 1.5811388
    s = 1 / math.sqrt(2.5)
    w = masked_whiten(X, M)
    close(w, [[-2 * s, -s, 0.0, 0.0], [s, 2 * s, 0.0, 0.0]])
    assert torch.isfinite(w).all()
    w2 = masked_whiten(X, M, shift_mean=False)  # mean added back
    close(w2, [[3 - 2 * s, 3 - s, 3.0, 0.0], [3 + s, 3 + 2 * s, 0.0, 0.0]])
    # whitened real tokens: mean 0, unbiased var 1
    close(masked_mean(w, M), 0.0)
    close(masked_var(w, M), 1.0, atol=1e-4)


def test_masked_whiten_bf16_and_single_token():
    w = masked_whiten(X.to(torch.bfloat16), M)
    assert w.dtype == torch.float32
    s = 1 / math.sqrt(2.5)
    close(w, [[-2 * s, -s, 0.0, 0.0], [s, 2 * s, 0.0, 0.0]], atol=1e-3)
    # a single real token: variance taken as 0, result 0 (not nan)
    w1 = masked_whiten(torch.tensor([[5.0, BIG]]), torch.tensor([[1.0, 0.0]]))
    close(w1, [[0.0, 0.0]])


def test_masked_whiten_two_ranks_equals_full_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]],
        dtype=torch.float32,
    )
    x = torch.where(mask.bool(), x, torch.full_like(x, BIG))
    full = masked_whiten(x, mask)

    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    captured = []
    for xh, mh in halves:  # collect each "rank's" local [sum, sum_sq, count]
        masked_whiten(xh, mh, reduce_fn=lambda t: (captured.append(t.clone()), t)[1])
    assert captured[0].shape == (3,)
    assert captured[0][2].item() == 8 and captured[1][2].item() == 9  # local token counts

    # fake all-reduce(sum): each rank adds the other's stats
    r0 = masked_whiten(*halves[0], reduce_fn=lambda t: t + captured[1].to(t.dtype))
    r1 = masked_whiten(*halves[1], reduce_fn=lambda t: t + captured[0].to(t.dtype))
    torch.testing.assert_close(torch.cat([r0, r1]), full)
    # and local whitening differs (so the test would catch an ignored reduce_fn)
    assert not torch.allclose(masked_whiten(*halves[0]), full[:3])


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # d = logp - ref = [0.5, -1.0]
    close(kl_estimate(logp, ref, "k1"), [0.5, -1.0])
    close(kl_estimate(logp, ref), [0.5, -1.0])  # default k1
    close(kl_estimate(logp, ref, "k2"), [0.125, 0.5])  # 0.5*d^2
    # k3 with r = ref - logp = [-0.5, 1.0]: e^-0.5 - 1 + 0.5 = 0.1065307, e^1 - 1 - 1 = 0.7182818
    close(kl_estimate(logp, ref, "k3"), [0.1065307, 0.7182818])
    close(kl_estimate(logp, ref, "abs"), [0.5, 1.0])
    # bf16 inputs -> float32 result
    assert kl_estimate(logp.bfloat16(), ref.bfloat16(), "k3").dtype == torch.float32
    with pytest.raises(ValueError, match="k1.*k2.*k3.*abs"):
        kl_estimate(logp, ref, "k4")


def test_per_token_rewards_score_on_last_token():
    # rows of length 3, 1 and 0; logp - ref = 0.25 on real tokens, garbage on padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    ref = torch.full((3, 3), -1.0)
    logp = torch.where(mask.bool(), ref + 0.25, torch.full_like(ref, BIG))
    scores = torch.tensor([2.0, -1.0, 7.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.5)
    # -0.5 * 0.25 = -0.125 per real token; score added on last real token; row 2 gets nothing
    close(rewards, [[-0.125, -0.125, 1.875], [-1.125, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(kl, [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert rewards.dtype == torch.float32 and not rewards.requires_grad


def test_per_token_rewards_k2_and_bf16():
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.5, 9.0]]).bfloat16()
    ref = torch.tensor([[-2.0, -1.0, 0.0]]).bfloat16()
    # d = [1, -0.5]; k2 = [0.5, 0.125]; kl_coef 0.1 -> [-0.05, -0.0125]; score 1 on index 1
    rewards, kl = per_token_rewards(torch.tensor([1.0]), logp, ref, mask, kl_coef=0.1, estimator="k2")
    close(kl, [[0.5, 0.125, 0.0]])
    close(rewards, [[-0.05, 0.9875, 0.0]])


# ---------------------------------------------------------------- GAE


R3 = torch.tensor([[1.0, 0.0, 2.0]])
V3 = torch.tensor([[0.5, 1.0, 1.5]])


def test_gae_gamma1_lam095():
    # delta2 = 2 - 1.5 = 0.5 (bootstrap 0 after the last token)
    # delta1 = 0 + 1.5 - 1.0 = 0.5 ; delta0 = 1 + 1.0 - 0.5 = 1.5
    # A2 = 0.5 ; A1 = 0.5 + 0.95*0.5 = 0.975 ; A0 = 1.5 + 0.95*0.975 = 2.42625
    adv, ret = gae_advantages(R3, V3, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(adv, [[2.42625, 0.975, 0.5]])
    close(ret, [[2.92625, 1.975, 2.0]])  # A + V


def test_gae_gamma09_lam1_is_discounted_return_minus_value():
    # G2 = 2 ; G1 = 0 + 0.9*2 = 1.8 ; G0 = 1 + 0.9*1.8 = 2.62
    # A = G - V = [2.12, 0.8, 0.5] ; returns = G
    adv, ret = gae_advantages(R3, V3, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(adv, [[2.12, 0.8, 0.5]])
    close(ret, [[2.62, 1.8, 2.0]])


def test_gae_with_padding_rows_of_different_length():
    # row 0: the 3-token example padded to T=4; row 1: length 2 (r=[0,1], v=[0.5,0.25])
    # row 1: delta1 = 1 - 0.25 = 0.75 (next value 0, NOT the padded 1e6)
    #        delta0 = 0 + 0.25 - 0.5 = -0.25 ; A0 = -0.25 + 0.95*0.75 = 0.4625
    rewards = torch.tensor([[1.0, 0.0, 2.0, BIG], [0.0, 1.0, BIG, BIG]])
    values = torch.tensor([[0.5, 1.0, 1.5, BIG], [0.5, 0.25, BIG, INF]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[2.42625, 0.975, 0.5, 0.0], [0.4625, 0.75, 0.0, 0.0]])
    close(ret, [[2.92625, 1.975, 2.0, 0.0], [0.9625, 1.0, 0.0, 0.0]])
    assert adv.dtype == torch.float32


# ---------------------------------------------------------------- policy / value loss


def test_policy_loss_clipping_positive_and_negative_advantages():
    c = 0.2
    ratios = [1.5, 0.5, 1.1, 1.5, 0.5]
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 123.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -3.0, 0.0]])
    logp = old.clone()
    logp[0, :5] += torch.log(torch.tensor(ratios))
    logp[0, 5] = 1e4  # padding: exp would overflow if not masked
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, st = policy_loss(logp, old, adv, mask, clip_range=c)
    # per token max(-A r, -A clamp(r, .8, 1.2)):
    #   r=1.5,A=+1: max(-1.5,-1.2) = -1.2 (clipped) | r=0.5,A=+1: max(-0.5,-0.8) = -0.5
    #   r=1.1,A=+1: -1.1 (inside)                  | r=1.5,A=-1: max(1.5,1.2) = 1.5
    #   r=0.5,A=-1: max(0.5,0.8) = 0.8 (clipped)
    # loss = (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5 = -0.1 ; clipfrac = 2/5
    close(loss, -0.1)
    close(st["clipfrac"], 0.4, atol=0)
    close(st["ratio_mean"], 1.02)  # 5.1 / 5
    close(st["ratio_max"], 1.5)
    # approx_kl = mean(0.5 * ln(r)^2)
    exp_kl = sum(0.5 * math.log(r) ** 2 for r in ratios) / 5  # = 0.1298794
    close(st["approx_kl"], exp_kl)
    assert all(not v.requires_grad for v in st.values())
    loss.backward()
    # d loss / d logp_i = -A_i r_i / 5 where unclipped, 0 where clipped or padded
    close(logp.grad, [[0.0, -0.1, -0.22, 0.3, 0.0, 0.0]])


def test_policy_loss_bf16_no_clip_when_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, 0.0]]).bfloat16()
    adv = torch.tensor([[2.0, -4.0, 0.0]])
    loss, st = policy_loss(logp, logp.clone(), adv, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    close(loss, 1.0)  # mean(-2*1, +4*1) = 1
    close(st["clipfrac"], 0.0, atol=0)
    assert loss.dtype == torch.float32


def test_value_loss_clipped_vs_unclipped():
    # c = 0.5
    # tok1: old 0, v 1, R 2 -> v_clip 0.5: (v-R)^2 = 1, (vc-R)^2 = 2.25 -> 2.25 (clip active)
    # tok2: old 0, v 1, R 0 -> v_clip 0.5: 1 vs 0.25 -> 1
    # tok3: old 1, v 1.25, R 1 -> v_clip 1.25: 0.0625 vs 0.0625 -> 0.0625
    values = torch.tensor([[1.0, 1.0, 1.25, BIG]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 1.0, -BIG]])
    ret = torch.tensor([[2.0, 0.0, 1.0, INF]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, st = value_loss(values, old, ret, mask, clip_range=0.5)
    close(loss, 0.5 * (2.25 + 1.0 + 0.0625) / 3)  # 0.5520833
    close(st["vf_clipfrac"], 1 / 3)
    loss.backward()
    # grad: tok1 clipped (0), tok2 (v-R)/3 = 1/3, tok3 0.25/3, padding 0
    close(values.grad, [[0.0, 1 / 3, 0.25 / 3, 0.0]])

    loss_u, st_u = value_loss(values, old, ret, mask, clip_range=None)
    close(loss_u, 0.5 * (1.0 + 1.0 + 0.0625) / 3)  # 0.34375
    close(st_u["vf_clipfrac"], 0.0, atol=0)


# ---------------------------------------------------------------- logits


def test_entropy_uniform_and_hand_value():
    V = 7
    close(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    close(entropy_from_logits(torch.full((V,), 100.0).bfloat16()), math.log(V))  # shift invariant
    # p = [0.25, 0.75]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), 0.5623351)
    # -inf logits: two live tokens -> ln 2, finite gradient
    lg = torch.tensor([0.0, -INF, -INF, 0.0], requires_grad=True)
    h = entropy_from_logits(lg)
    close(h, math.log(2))
    h.backward()
    assert torch.isfinite(lg.grad).all()


def test_logprobs_with_temperature():
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]])  # (1, 1, 2)
    # T=1: p = [1, 9]/10 -> ln 0.9 = -0.1053605, ln 0.1 = -2.3025851
    close(logprobs_from_logits(logits, torch.tensor([[1]])), [[-0.1053605]])
    close(logprobs_from_logits(logits, torch.tensor([[0]])), [[-2.3025851]])
    # T=2: scaled logits [0, ln 3] -> p = [0.25, 0.75]: ln 0.75 = -0.2876821, ln 0.25 = -1.3862944
    close(logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0), [[-0.2876821]])
    close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0), [[-1.3862944]])
    # caller's tensor untouched, bf16 gives float32, matches log_softmax on random data
    assert logits[0, 0, 1].item() == pytest.approx(2 * math.log(3.0))
    torch.manual_seed(0)
    rl = torch.randn(2, 4, 11)
    lab = torch.randint(0, 11, (2, 4))
    ref = torch.log_softmax(rl / 0.7, -1).gather(-1, lab[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(rl, lab, temperature=0.7), ref)
    out = logprobs_from_logits(rl.bfloat16(), lab)
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    with pytest.raises(ValueError):
        logprobs_from_logits(rl, lab, temperature=0.0)


# ---------------------------------------------------------------- explained variance


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0, BIG]])
    close(explained_variance(ret.clone(), ret, mask), 1.0)  # perfect
    # values [1,2,3,3]: diff [0,0,0,1], var = 0.1875 ; var(ret) = 1.25 -> 1 - 0.15 = 0.85
    vals = torch.tensor([[1.0, 2.0, 3.0, 3.0, -BIG]])
    close(explained_variance(vals, ret, mask), 0.85)
    close(explained_variance(torch.zeros(1, 5), ret, mask), 0.0)  # constant predictor
    # constant returns -> undefined -> nan (documented)
    assert torch.isnan(explained_variance(vals, torch.full((1, 5), 2.0), mask))


# ---------------------------------------------------------------- running moments


def test_running_moments_hand_and_three_updates():
    rm = RunningMoments()
    assert (rm.mean, rm.std, rm.count) == (0.0, 1.0, 0.0)
    # [1,2,3]: mean 2, unbiased std 1
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    assert (rm.mean, rm.std, rm.count) == pytest.approx((2.0, 1.0, 3.0))
    # + [4,5]: batch mean 4.5, std sqrt(0.5); running over 1..5: mean 3, std sqrt(2.5)
    assert rm.update(torch.tensor([[4.0], [5.0]]).bfloat16()) == pytest.approx((4.5, math.sqrt(0.5)))
    assert (rm.mean, rm.std, rm.count) == pytest.approx((3.0, math.sqrt(2.5), 5.0))
    torch.manual_seed(0)
    b3 = torch.randn(4, 7) * 2 + 3
    bm, bs = rm.update(b3)
    assert (bm, bs) == pytest.approx((b3.mean().item(), b3.std().item()), rel=1e-5)
    allx = torch.cat([torch.tensor([1.0, 2, 3, 4, 5]), b3.flatten()])
    assert rm.mean == pytest.approx(allx.mean().item(), rel=1e-5)
    assert rm.std == pytest.approx(allx.std().item(), rel=1e-5)
    assert rm.count == 33

    # state_dict round trip: a fresh object continues identically
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert (rm2.mean, rm2.std, rm2.count) == (rm.mean, rm.std, rm.count)
    b4 = torch.tensor([10.0, -10.0, 0.5])
    assert rm.update(b4) == rm2.update(b4)
    assert rm.state_dict() == rm2.state_dict()


def test_running_moments_reduce_fn_two_ranks():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    other = {}
    RunningMoments().update(b, reduce_fn=lambda t: (other.setdefault("b", t.clone()), t)[1])
    rm = RunningMoments()
    # global batch 1..5: mean 3, std sqrt(2.5)
    assert rm.update(a, reduce_fn=lambda t: t + other["b"]) == pytest.approx((3.0, math.sqrt(2.5)))
    assert rm.count == 5


def test_normalize_and_clip():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, std 1
    s = torch.tensor([0.0, 2.0, 10.0])
    close(normalize_and_clip(s, rm, None), [-2.0, 0.0, 8.0])
    close(normalize_and_clip(s, rm, 5.0), [-2.0, 0.0, 5.0])
    close(normalize_and_clip(s, None, 1.0), [0.0, 1.0, 1.0])
    close(normalize_and_clip(s, None, None), [0.0, 2.0, 10.0])
    zero_std = RunningMoments()
    zero_std.load_state_dict({"mean": 0.0, "var": 0.0, "std": 0.0, "count": 5.0})
    close(normalize_and_clip(torch.tensor([3e-8]), zero_std, None), [3.0])  # std floored at 1e-8
    with pytest.raises(ValueError):
        normalize_and_clip(s, None, -1.0)


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    c = FixedKLController(0.1)
    c.update(5.0, 100)
    assert c.value == 0.1
    c2 = FixedKLController(0.7)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.1
    with pytest.raises(ValueError):
        c2.load_state_dict(AdaptiveKLController(0.1, 6.0, 10000).state_dict())


def test_adaptive_kl_controller():
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # above target: e = 6.6/6 - 1 = 0.1 ; mult = 1 + 0.1*256/10000 = 1.00256
    c.update(6.6, n_steps=256)
    assert c.value == pytest.approx(0.100256)
    c = AdaptiveKLController(0.1, 6.0, 10000)
    # below target: e = -0.1 ; mult = 0.99744
    c.update(5.4, n_steps=256)
    assert c.value == pytest.approx(0.099744)
    c = AdaptiveKLController(0.1, 6.0, 10000)
    # far above: e = 12/6 - 1 = 1 -> clipped 0.2 ; mult = 1.00512
    c.update(12.0, n_steps=256)
    assert c.value == pytest.approx(0.100512)
    # then far below: e = -1 -> clipped -0.2 ; mult = 0.99488 (compounds)
    c.update(0.0, n_steps=256)
    assert c.value == pytest.approx(0.100512 * 0.99488)

    c2 = AdaptiveKLController(0.5, 6.0, 10000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value
    with pytest.warns(UserWarning):
        AdaptiveKLController(0.5, 3.0, 10000).load_state_dict(c.state_dict())
    with pytest.raises(ValueError):
        c2.load_state_dict(FixedKLController(0.1).state_dict())


# ---------------------------------------------------------------- loss aggregation (ppo.loss_aggregation)

# rows of 3 and 1 real tokens; garbage in the padding
AGG_X = torch.tensor([[1.0, 2.0, 3.0, BIG], [4.0, INF, float("nan"), BIG]])
AGG_M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode, value, denom", [
    ("token_mean", 2.5, 4.0),               # (1+2+3+4) / 4 tokens
    ("seq_mean_token_mean", 3.0, 2.0),      # (mean(1,2,3) = 2  +  mean(4) = 4) / 2 rows
    ("token_sum_norm", 1.0, 10.0),          # (1+2+3+4) / (2 rows x constant 5)
])
def test_aggregate_loss_hand_values_and_split_into_micro_batches(mode, value, denom):
    close(aggregate_loss(AGG_X, AGG_M, mode, 5), value)
    close(loss_denominator(AGG_M, mode, 5), denom)
    # the loop's rescaling: each micro-batch's aggregate x its denominator / the global one sums to the whole
    parts = sum(aggregate_loss(AGG_X[i:i + 1], AGG_M[i:i + 1], mode, 5) * loss_denominator(AGG_M[i:i + 1], mode, 5)
                / denom for i in range(2))
    close(parts, value)


def test_losses_take_the_aggregation():
    logp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    # ratio 1: the per-token loss is -A, so the aggregates are those of -A
    close(policy_loss(logp, logp, adv, AGG_M, 0.2, "seq_mean_token_mean")[0], -3.0)
    close(policy_loss(logp, logp, adv, AGG_M, 0.2, "token_sum_norm", 5)[0], -1.0)
    # value loss 0.5 (v - R)^2 with v = 0, R = adv: per-token 0.5, 2, 4.5 | 8
    close(value_loss(torch.zeros(2, 4), torch.zeros(2, 4), adv, AGG_M, None, "seq_mean_token_mean")[0],
          ((0.5 + 2 + 4.5) / 3 + 8) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(AGG_X, AGG_M, "sum")
    with pytest.raises(ValueError, match="constant"):
        aggregate_loss(AGG_X, AGG_M, "token_sum_norm")


def test_kl_as_a_loss_has_the_hand_gradients():
    # logp = 0 (p = 1), ref = log 0.5: k3 = 0.5 - 1 - log 0.5 ; d k3 / d logp = 1 - exp(ref - logp) = 0.5
    logp = torch.zeros(1, requires_grad=True)
    ref = torch.tensor([math.log(0.5)])
    k3 = kl_estimate(logp, ref, "k3")
    close(k3, [0.5 - 1 - math.log(0.5)])
    k3.sum().backward()
    close(logp.grad, [0.5])
    logp.grad = None
    kl_estimate(logp, ref, "k2").sum().backward()   # d/dlogp 0.5 (logp - ref)^2 = logp - ref = log 2
    close(logp.grad, [math.log(2)])


def test_std_only_reward_scaling_keeps_the_zero():
    m = RunningMoments()
    m.mean, m.std = 2.0, 4.0
    close(normalize_and_clip(torch.tensor([2.0, 6.0, -2.0]), m, None, shift_mean=False), [0.5, 1.5, -0.5])
    close(normalize_and_clip(torch.tensor([2.0, 6.0, -2.0]), m, None), [0.0, 1.0, -1.0])
    close(normalize_and_clip(torch.tensor([2.0, 60.0]), m, 3.0, shift_mean=False), [0.5, 3.0])


# ---------------------------------------------------------------- advantage estimators (train/advantages.py)

# 2 prompts x k=3 responses, rows in the rollout's order; per-token rewards (-beta*KL + score on the last token)
GROUP_REWARDS = torch.tensor([
    [0.0, 1.0, BIG],      # total 1
    [0.5, 1.5, INF],      # total 2
    [6.0, 0.0, 0.0],      # total 6 (one token)
    [0.0, 0.0, 0.0],      # total 0
    [0.0, 0.0, 0.0],      # total 0
    [1.0, 2.0, 0.0],      # total 3
])
GROUP_MASK = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]).float()


def test_sequence_rewards_sum_the_real_tokens():
    close(sequence_rewards(GROUP_REWARDS, GROUP_MASK), [1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def test_rloo_hand_values():
    # group 1 = [1, 2, 6]: 1 - (2+6)/2 = -3 ; 2 - (1+6)/2 = -1.5 ; 6 - (1+2)/2 = 4.5
    # group 2 = [0, 0, 3]: 0 - 3/2 = -1.5 ; -1.5 ; 3 - 0 = 3
    seq = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    close(rloo_advantages(seq, 3), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    close(rloo_advantages(torch.tensor([1.0, 3.0]), 2), [-2.0, 2.0])
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(seq, 1)
    with pytest.raises(ValueError, match="groups of k=4"):
        rloo_advantages(seq, 4)


def test_grpo_hand_values_with_and_without_std():
    seq = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # group 1: mean 3, deviations -2, -1, 3, unbiased var (4+1+9)/2 = 7 ; group 2: mean 1, -1, -1, 2, var 3
    s1, s2 = math.sqrt(7) + 1e-4, math.sqrt(3) + 1e-4
    close(grpo_advantages(seq, 3), [-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2])
    close(grpo_advantages(seq, 3, scale_by_std=False), [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])   # Dr. GRPO
    close(grpo_advantages(torch.full((4,), 5.0), 2), [0.0] * 4)                             # all equal: 0
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(seq, 1)


def test_broadcast_and_critic_free_dispatch():
    adv = critic_free_advantages("rloo", GROUP_REWARDS, GROUP_MASK, 3, 1.0, True, whiten=False)
    close(adv, [[-3.0, -3.0, 0.0], [-1.5, -1.5, 0.0], [4.5, 0.0, 0.0], [-1.5, -1.5, -1.5], [-1.5, 0.0, 0.0],
                [3.0, 3.0, 0.0]])
    close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 0], [1, 1]])), [[2.0, 0.0], [-1.0, -1.0]])
    dr = critic_free_advantages("grpo", GROUP_REWARDS, GROUP_MASK, 3, 1.0, False, whiten=True)  # whiten: rloo only
    close(dr[:, 0], [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])
    whitened = critic_free_advantages("rloo", GROUP_REWARDS, GROUP_MASK, 3, 1.0, True, whiten=True)
    close(masked_mean(whitened, GROUP_MASK), 0.0)
    close(masked_var(whitened, GROUP_MASK), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown critic-free estimator"):
        critic_free_advantages("ppo", GROUP_REWARDS, GROUP_MASK, 3, 1.0, True, True)


def test_reward_to_go_and_reinforce_pp_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [2.0, BIG, BIG]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).float()
    # gamma 0.5: G = [1 + 0.5 (2 + 0.5 * 4), 2 + 0.5 * 4, 4] = [3, 4, 4] ; row 2: [2]
    close(reward_to_go(rewards, mask, 0.5), [[3.0, 4.0, 4.0], [2.0, 0.0, 0.0]])
    # whitened over the 4 real tokens: mean 3.25, unbiased var (0.0625 + 0.5625 + 0.5625 + 1.5625) / 3 = 11/12
    s = math.sqrt(11 / 12)
    want = [[-0.25 / s, 0.75 / s, 0.75 / s], [-1.25 / s, 0.0, 0.0]]
    close(reinforce_pp_advantages(rewards, mask, 0.5), want, atol=1e-4)
    # global statistics: rank 0 holds row 1, rank 1 row 2; each whitens with the sum of both ranks' stats
    def other(rows):
        g = reward_to_go(rewards[rows], mask[rows], 0.5)
        return torch.stack([g.sum(), (g * g).sum(), mask[rows].sum()]).double()

    r0 = reinforce_pp_advantages(rewards[:1], mask[:1], 0.5, reduce_fn=lambda t: t + other(slice(1, 2)))
    r1 = reinforce_pp_advantages(rewards[1:], mask[1:], 0.5, reduce_fn=lambda t: t + other(slice(0, 1)))
    close(torch.cat([r0, r1]), want, atol=1e-4)


def test_decoupled_gae_gives_the_critic_monte_carlo_returns():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # lam 0: A_t = delta_t = r_t + V_{t+1} - V_t = [0, 0, 1 - 0.5] ; lam 1: returns = sum of future rewards = 1
    adv, ret = decoupled_gae(rewards, values, mask, 1.0, 0.0, 1.0)
    close(adv, [[0.0, 0.0, 0.5]])
    close(ret, [[1.0, 1.0, 1.0]])
    adv2, ret2 = decoupled_gae(rewards, values, mask, 1.0, 0.0, 0.0)  # coupled: returns = A + V
    close(ret2, [[0.5, 0.5, 1.0]])


def test_value_clip_range_modes():
    returns = torch.tensor([[1.0, 2.0, BIG], [3.0, 6.0, INF]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]]).float()
    assert value_clip_range("absolute", 0.2, returns, mask) == 0.2
    assert value_clip_range("none", 0.2, returns, mask) is None
    # 1, 2, 3, 6: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3
    assert value_clip_range("relative", 0.2, returns, mask) == pytest.approx(0.2 * math.sqrt(14 / 3))
    # over two ranks: the global std
    def half(rows):
        r = torch.where(mask[rows].bool(), returns[rows], 0.0)
        return torch.stack([r.sum(), (r * r).sum(), mask[rows].sum()]).double()

    got = value_clip_range("relative", 0.2, returns[:1], mask[:1], reduce_fn=lambda t: t + half(slice(1, 2)))
    assert got == pytest.approx(0.2 * math.sqrt(14 / 3))
