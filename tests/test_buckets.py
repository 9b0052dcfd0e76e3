"""Length buckets (train/buckets.py, ppo.bucket_by_length): the same update, the same gradient-free passes, fewer
padded tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from detoxrl.train.buckets import by_length, padded_tokens, sorted_chunks, used_columns
from detoxrl.train.config import PPOConfig
from detoxrl.train.experience import Experience, forward_in_chunks, reference_in_chunks
from detoxrl.train.ppo_math import logprobs_from_logits
from detoxrl.train.rollout import Rollout, pad_prompts
from detoxrl.train.update import micro_batches, ppo_update

from test_models import critic_policy, perturb_lora


def test_by_length_is_stable_and_longest_first():
    resp = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    prompt = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 1]])
    assert by_length(resp, prompt).tolist() == [1, 2, 0, 3]   # row 2 before row 0: same response, longer prompt


def test_sorted_chunks_keep_groups_together():
    resp = torch.zeros(6, 5)
    for row, n in enumerate([1, 2, 5, 1, 3, 3]):
        resp[row, :n] = 1
    prompt = torch.ones(6, 2)
    chunks = sorted_chunks(resp, prompt, 4, group=2)
    assert [c.tolist() for c in chunks] == [[2, 3, 4, 5], [0, 1]]   # groups ranked by their longest row: 5, 3, 2
    with pytest.raises(ValueError, match="groups of 4"):
        sorted_chunks(resp, prompt, 4, group=4)


def test_used_columns_cut_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    resp = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert used_columns(left, resp) == (slice(2, 4), slice(0, 2))
    assert used_columns(right, resp) == (slice(0, 2), slice(0, 2))


def _varied_batch(policy, kind: str, rows: int = 8, T: int = 16, seed: int = 0) -> Experience:
    """Rows of very different prompt and response lengths (the case buckets are for)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 100, (int(n),), generator=g).tolist() + [1]
               for n in torch.randint(2, 14, (rows,), generator=g)]
    ids, mask = pad_prompts(prompts, 0, kind == "causal", torch.device("cpu"))
    resp = torch.randint(3, 100, (rows, T), generator=g)
    lengths = torch.tensor([1, 16, 3, 12, 2, 15, 5, 4])[:rows]
    m = (torch.arange(T)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        logits, values = policy(ids, mask, resp)
    old = logprobs_from_logits(logits, resp, 1.0).float() - 0.05 * torch.randn(rows, T, generator=g)
    return Experience(ids, mask, resp, m, old, values.float(), torch.randn(rows, T, generator=g) * 10,
                      torch.randn(rows, T, generator=g), old - 0.1)


def _one_update(accelerator, policy, batch: Experience, bucket: bool) -> dict[str, torch.Tensor]:
    policy = copy.deepcopy(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)   # the step is the gradient itself
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(policy, optimizer)
    ppo = PPOConfig(batch_size=8, mini_batch_size=8, gradient_accumulation_steps=4, ppo_epochs=1,
                    max_grad_norm=None, vf_coef=0.5, entropy_coef=0.01, bucket_by_length=bucket)
    result = ppo_update(accelerator, model, optimizer, scheduler, batch, ppo, 1.0, shuffle_seed=3)
    assert result.skipped == 0
    return {k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_bucketed_update_equals_the_padded_one_and_pads_less(test_models, family):
    """One mini-batch of 8 rows in 4 micro-batches: the weights after one SGD step (lr 1: the accumulated gradient)
    agree with and without buckets, and the buckets compute far fewer prompt + response slots."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    torch.manual_seed(0)
    policy = critic_policy(test_models, "shared", family)
    perturb_lora(policy, 0.2)
    torch.nn.init.normal_(policy.v_head.weight, std=0.1)
    batch = _varied_batch(policy, policy.kind)
    start = {k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}
    padded = _one_update(accelerator, policy, batch, bucket=False)
    bucketed = _one_update(accelerator, policy, batch, bucket=True)
    moved = max((padded[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3                                    # the update did something
    for k in start:
        torch.testing.assert_close(bucketed[k], padded[k], rtol=1e-4, atol=1e-5 * max(1.0, moved))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    plain = padded_tokens(batch.prompt_mask, batch.mask, micro_batches(batch, order, 2, False), trim=False)
    cut = padded_tokens(batch.prompt_mask, batch.mask, micro_batches(batch, order, 2, True), trim=True)
    assert cut < 0.75 * plain, (cut, plain)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_bucketed_gradient_free_passes_match(test_models, family):
    """Old log-probs, values and the reference's log-probs in length-sorted, trimmed chunks of 2 (k=2 groups kept
    together) equal the padded whole-batch passes on every real token."""
    torch.manual_seed(0)
    policy = critic_policy(test_models, "shared", family)
    perturb_lora(policy, 0.2)
    torch.nn.init.normal_(policy.v_head.weight, std=0.1)
    b = _varied_batch(policy, policy.kind)
    k = 2 if family == "t5" else 1
    if k > 1:   # k responses per prompt: consecutive rows share a prompt
        b.prompt_ids, b.prompt_mask = b.prompt_ids[::k].repeat_interleave(k, 0), b.prompt_mask[::k].repeat_interleave(k, 0)
    rollout = Rollout(b.prompt_ids, b.prompt_mask, b.response_ids, b.mask.long(), torch.ones(8, dtype=torch.bool))
    m = b.mask.bool()
    logp0, v0 = forward_in_chunks(policy, rollout, 8, 0.7, group=k, bucket=False)
    logp1, v1 = forward_in_chunks(policy, rollout, 2, 0.7, group=k, bucket=True)
    torch.testing.assert_close(logp1[m], logp0[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v1[m], v0[m], rtol=1e-4, atol=1e-5)
    for ids in sorted_chunks(rollout.response_mask, rollout.prompt_mask, 2, k):   # each chunk its own width
        width = int(rollout.response_mask[ids].sum(1).max())
        assert (logp1[ids, width:] == 0).all()
    ref0 = reference_in_chunks(policy, None, rollout, 8, 0.7, group=k, bucket=False)
    ref1 = reference_in_chunks(policy, None, rollout, 2, 0.7, group=k, bucket=True)
    torch.testing.assert_close(ref1[m], ref0[m], rtol=1e-4, atol=1e-5)
