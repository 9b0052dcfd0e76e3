"""Steps 1-5 of a PPO iteration: prompts in, one `Experience` out (docs/ARCHITECTURE.md, "one PPO iteration").

    sample_responses   batched sampling from the policy, decoded to text (the trainer's rollouts, its held-out
                       evaluation and detoxrl-eval all sample and decode through it)
    score_responses    the reward (RewardModel.score: the weighted sum, non-finite scores refused), optionally the
                       toxicity of the response alone and each judge's P(toxic)
    shaped_scores      the training score: missing-EOS penalty, running normalisation, clip
    in_chunks          a gradient-free pass in chunks (length-sorted, unused padding cut, with ppo.bucket_by_length)
    forward_in_chunks  old log-probs and values of the sampled responses under the policy
    reference_in_chunks  the frozen reference's log-probs of them
    advantages_and_returns  per-token rewards (-beta*KL + score), then GAE or a critic-free estimator

`Experience` is what the PPO update (train/update.py) reads, as it is, plus what the step's bookkeeping reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from detoxrl.train.advantages import critic_free_advantages, decoupled_gae
from detoxrl.train.buckets import sorted_chunks, used_columns
from detoxrl.train.config import Config, GenerationConfig
from detoxrl.train.models import reference_logprobs
from detoxrl.train.rollout import Rollout, generate_rollouts
from detoxrl.train.ppo_math import (RunningMoments, logprobs_from_logits, masked_whiten, normalize_and_clip,
                                    per_token_rewards)
from detoxrl.train.reward import RewardModel, RewardTerm


@dataclass
class Experience:
    """This rank's share of one step's responses (B rows = its prompts x k), as steps 1-5 leave it.

    The first fields are what the PPO update reads (every tensor (B, ...) on the policy's device); the rest is what
    the step's bookkeeping (metrics, samples, judges) reads."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor             # (B, T) float: 1 on real response tokens (up to and including the first EOS)
    old_logp: torch.Tensor         # (B, T) under the policy before the update
    old_values: torch.Tensor       # (B, T) the critic's values before the update (0 without a critic)
    advantages: torch.Tensor
    returns: torch.Tensor          # (B, T) the critic's targets (0 without a critic)
    ref_logp: Optional[torch.Tensor] = None   # (B, T) under the frozen reference (a KL loss term reads it)
    ended: Optional[torch.Tensor] = None      # (B,) bool: the response contains EOS
    prompt_indices: list[int] = field(default_factory=list)  # into the training prompts, one per prompt (not row)
    prompt_texts: list[str] = field(default_factory=list)    # one per response
    responses: list[str] = field(default_factory=list)
    raw_scores: Optional[torch.Tensor] = None  # (B,) CPU: the reward before the EOS penalty and normalisation
    term_scores: list[torch.Tensor] = field(default_factory=list)  # each reward term's (B,) scores
    scores: Optional[torch.Tensor] = None      # (B,) the training score (penalised, normalised, clipped)
    kl: Optional[torch.Tensor] = None          # (B, T) per-token KL estimate to the reference

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response tokens (long)."""
        return self.mask.sum(1).long()


def draw_max_new_tokens(cfg: Config, step: int) -> int:
    rng_range = cfg.generation.max_new_tokens_range
    if rng_range is None:
        return cfg.generation.max_new_tokens
    # Seeded by (seed, step): the same on every rank and after a resume.
    return int(np.random.default_rng([cfg.run.seed, step]).integers(rng_range[0], rng_range[1] + 1))


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def sample_responses(policy, prompts: list[list[int]], tokenizer, gen: GenerationConfig, max_new_tokens: int,
                     device: torch.device, synced_gpus: bool = False, k: int = 1,
                     seed: Optional[int] = None, keep: tuple[bool, bool] = (False, False)) -> tuple[Rollout, list[str]]:
    """Sample `k` responses per prompt (rollout.generate_rollouts) and decode them. With `seed`, sampled from that
    seed inside a forked RNG, so the caller's random streams are left as they were (evaluation). `keep`: whether
    the rollout keeps the sampling pass's (log-probs, last hidden states) (`kept_from_rollout`)."""
    def run() -> Rollout:
        return generate_rollouts(policy, prompts, tokenizer, gen, max_new_tokens, device, synced_gpus, k=k,
                                 keep_logprobs=keep[0], keep_hidden=keep[1])

    if seed is None:
        rollout = run()
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            rollout = run()
    return rollout, decode_responses(tokenizer, rollout)


def kept_from_rollout(cfg: Config, critic_mode: str) -> tuple[bool, bool]:
    """ppo.rollout_logprobs: what the rollout keeps from sampling, (log-probs, last hidden states): the hidden
    states when a value head on the policy's own states needs them (GAE, critic.mode shared or detached)."""
    keep = cfg.ppo.rollout_logprobs
    return keep, keep and cfg.ppo.estimator == "gae" and critic_mode != "adapter"


@dataclass
class Scores:
    """Per-response scores (CPU float32, input order)."""
    reward: torch.Tensor                   # (N,) the weighted sum of the terms
    terms: list[torch.Tensor]              # each term's (N,) scores
    toxicity: Optional[torch.Tensor]       # (N,) P(toxic label) of the response alone; None when not asked
    judges: dict[str, torch.Tensor]        # judge name -> (N,) P(toxic)


def score_responses(reward: RewardModel, prompts: list[str], responses: list[str],
                    toxicity: Optional[tuple[RewardTerm, str]] = None, judges=()) -> Scores:
    """The reward (every term; the prompt cut from the left where a term scores it), the toxicity (`toxicity`: a
    classifier and its label) of the response alone, and each judge's P(toxic)."""
    total, per_term = reward.score(prompts, responses)
    tox = None
    if toxicity is not None:
        term, label = toxicity
        tox = term.label_probability(responses, label)
    judged = {j.name: j.toxicity(responses) for j in judges}
    return Scores(total, per_term, tox, judged)


def shaped_scores(cfg: Config, raw_scores: torch.Tensor, ended: torch.Tensor, moments: Optional[RunningMoments],
                  reduce_fn, device: torch.device) -> torch.Tensor:
    """The training score of each response: the missing-EOS penalty, then the running normalisation (its
    statistics updated over the global batch first) and the clip."""
    scores = raw_scores.clone()
    if cfg.ppo.missing_eos_penalty is not None:
        scores[~ended.cpu()] -= cfg.ppo.missing_eos_penalty
    if moments is not None:
        moments.update(scores, reduce_fn)
    return normalize_and_clip(scores, moments, cfg.reward.clip, cfg.reward.normalize_shift_mean).to(device)


def in_chunks(fn: Callable[..., tuple[torch.Tensor, ...]], rollout: Rollout, chunk: int, group: int = 1,
              bucket: bool = False) -> list[torch.Tensor]:
    """`fn(prompt_ids, prompt_mask, response_ids, encoder_states)` -> (rows, T') tensors, run on chunks of `chunk`
    rows (a multiple of `group`) and reassembled into (B, T) tensors in the rollout's row order (`encoder_states`:
    the chunk's rows of `rollout.encoder_states`, or None). With `bucket` the rows are sorted by length first
    (groups of `group` kept together) and each chunk drops the padding columns none of its rows uses
    (buckets.used_columns); the columns it drops are 0 in the result (masked everywhere downstream)."""
    B, T = rollout.response_ids.shape
    enc = rollout.encoder_states
    if not bucket:
        parts = [fn(rollout.prompt_ids[s:s + chunk], rollout.prompt_mask[s:s + chunk],
                    rollout.response_ids[s:s + chunk], None if enc is None else enc[s:s + chunk])
                 for s in range(0, B, chunk)]
        return [torch.cat(col) for col in zip(*parts)]
    outs: list[torch.Tensor] = []
    for ids in sorted_chunks(rollout.response_mask, rollout.prompt_mask, chunk, group):
        p, r = used_columns(rollout.prompt_mask[ids], rollout.response_mask[ids])
        part = fn(rollout.prompt_ids[ids][:, p], rollout.prompt_mask[ids][:, p], rollout.response_ids[ids][:, r],
                  None if enc is None else enc[ids][:, p])
        if not outs:
            outs = [torch.zeros((B, T), dtype=t.dtype, device=t.device) for t in part]
        for out, t in zip(outs, part):
            out[ids, :t.shape[1]] = t
    return outs


def forward_in_chunks(policy, rollout: Rollout, chunk: int, temperature: float, want_values: bool = True,
                      group: int = 1, bucket: bool = False,
                      reuse_encoder: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs and values (B, T) of the sampled responses, without gradients (values 0 without a critic).
    `chunk` rows at a time, a multiple of `group` (responses per prompt: seq2seq encodes each prompt once); `bucket`:
    length-sorted chunks without unused padding (`in_chunks`). A seq2seq rollout's encoder states are reused (the
    encoder does not run again; `reuse_encoder=False` runs it, for tests)."""
    def one(prompt_ids, prompt_mask, response_ids, encoder_states):
        logits, v = policy(prompt_ids, prompt_mask, response_ids, want_values=want_values, group=group,
                           encoder_states=encoder_states if reuse_encoder else None)
        logp = logprobs_from_logits(logits, response_ids, temperature).float()
        return logp, (v.float() if want_values else torch.zeros_like(logp))

    with torch.no_grad():
        logp, values = in_chunks(one, rollout, chunk, group, bucket)
    return logp, values


def old_logprobs_and_values(policy, rollout: Rollout, chunk: int, temperature: float, want_values: bool = True,
                            group: int = 1, bucket: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4's old log-probs and values (B, T): those the sampling pass kept (ppo.rollout_logprobs; the adapter
    critic's values then take its own pass), or a forward pass now (`forward_in_chunks`)."""
    if rollout.logprobs is None:
        return forward_in_chunks(policy, rollout, chunk, temperature, want_values, group, bucket)
    logp = rollout.logprobs
    if not want_values:
        return logp, torch.zeros_like(logp)
    if rollout.last_hidden is not None:
        with torch.no_grad():
            return logp, getattr(policy, "module", policy).value_of(rollout.last_hidden)

    def critic_only(prompt_ids, prompt_mask, response_ids, _):
        return (policy(prompt_ids, prompt_mask, response_ids, want_values=True, group=group,
                       want_logits=False)[1].float(),)

    with torch.no_grad():
        return logp, in_chunks(critic_only, rollout, chunk, group, bucket)[0]


def reference_in_chunks(policy, reference, rollout: Rollout, chunk: int, temperature: float, forward=None,
                        group: int = 1, bucket: bool = False) -> torch.Tensor:
    """The frozen reference's log-probs (B, T) (models.reference_logprobs): the whole batch in one pass, or with
    `bucket` in length-sorted chunks of `chunk` rows without unused padding."""
    if not bucket:
        return reference_logprobs(policy, reference, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                  temperature, forward=forward, group=group)
    return in_chunks(lambda p, m, r, _: (reference_logprobs(policy, reference, p, m, r, temperature, forward=forward,
                                                         group=group),), rollout, chunk, group, True)[0]


def advantages_and_returns(cfg: Config, scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                           old_values: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                           reduce_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, per-token KL): per-token rewards (-kl_coef*KL unless the KL is a loss term, + the score
    on the last token); GAE with the critic, or a critic-free estimator over the k responses per prompt (returns 0);
    advantages normalised over the global batch when ppo.whiten_advantages."""
    p = cfg.ppo
    kl_in_reward = kl_coef if p.kl.mode == "reward" else 0.0
    rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, kl_in_reward, p.kl.estimator)
    if p.estimator != "gae":
        advantages = critic_free_advantages(p.estimator, rewards, mask, p.k, p.gamma, p.group_std_scale,
                                            p.whiten_advantages, reduce_fn)
        return advantages, torch.zeros_like(advantages), kl
    advantages, returns = decoupled_gae(rewards, old_values, mask, p.gamma, p.lam,
                                        p.lam if cfg.critic.lam is None else cfg.critic.lam)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, reduce_fn=reduce_fn)
    return advantages, returns, kl

