"""Held-out evaluation, one sampling plan for the trainer (evaluation.before_after) and detoxrl-eval alike.

    plan       N prompts x `samples_per_prompt` draws = S samples; sample s answers prompt s % N (draw s // N);
               the samples are cut into fixed chunks of `batch_size`, chunk c sampled with seed (seed, c)
    generate   one fixed response budget (the recipe's max_new_tokens, or the low end of its range) and the
               recipe's sampling settings, in a forked RNG (training's random streams are left alone)
    score      per chunk, through experience.score_responses: every reward term, the toxicity (P(toxic label) of
               the evaluation classifier on the response alone) and each judge's P(toxic)

Every sample depends only on its chunk, so the trainer (every rank samples all chunks) and detoxrl-eval (rank r
takes chunks r, r + W, ...) print the same figures for the same policy, seed and settings.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import numpy as np
import torch

from detoxrl.train.config import Config, GenerationConfig
from detoxrl.train.experience import sample_responses, score_responses
from detoxrl.train.judges import Judge
from detoxrl.train.reward import RewardModel
from detoxrl.train.rollout import Rollout


def heldout_generation(g: GenerationConfig, max_new_tokens: Optional[int] = None,
                       batch_size: Optional[int] = None) -> GenerationConfig:
    """The recipe's sampling settings with one fixed response budget (default: `max_new_tokens`, or the low end of
    `max_new_tokens_range`: the seeds' 100 of 100..400) and `rollout_batch_size` = the chunk size."""
    max_new = max_new_tokens or (g.max_new_tokens_range[0] if g.max_new_tokens_range else g.max_new_tokens)
    return replace(g, max_new_tokens=max_new, max_new_tokens_range=None, min_new_tokens=min(g.min_new_tokens, max_new),
                   rollout_batch_size=batch_size or g.rollout_batch_size)


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk` (independent streams per chunk, reproducible from (seed, chunk))."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def sample_chunks(num_prompts: int, samples_per_prompt: int, batch_size: int) -> list[list[int]]:
    """Sample indices per chunk: S = num_prompts x samples_per_prompt samples in chunks of `batch_size`."""
    total = num_prompts * samples_per_prompt
    return [list(range(s, min(s + batch_size, total))) for s in range(0, total, batch_size)]


def sample_chunk(policy, prompt_ids: list[list[int]], samples: list[int], chunk: int, seed: int, tokenizer,
                 gen: GenerationConfig, device: torch.device,
                 synced_gpus: bool = False) -> tuple[Rollout, list[str]]:
    """Chunk `chunk`'s responses: sample s answers prompt s % len(prompt_ids), sampled with seed (seed, chunk)."""
    n = len(prompt_ids)
    return sample_responses(policy, [prompt_ids[s % n] for s in samples], tokenizer, gen, gen.max_new_tokens, device,
                            synced_gpus, seed=chunk_seed(seed, chunk))


def _std(values: torch.Tensor) -> float:
    return values.std().item() if len(values) > 1 else 0.0


def heldout_evaluation(policy, tokenizer, prompts: list[list[int]], prompt_texts: list[str], reward: RewardModel,
                       cfg: Config, device: torch.device, synced_gpus: bool = False,
                       judges: tuple[Judge, ...] | list[Judge] = ()) -> dict[str, Any]:
    """The trainer's held-out figures of `policy`: mean toxicity (the reward's classifier and every judge) and
    reward over every sample of the plan above (seed run.seed, evaluation.samples_per_prompt draws per prompt).
    Per-sample values are kept, for intervals (detoxrl-eval compare)."""
    gen = heldout_generation(cfg.generation)
    n, draws = len(prompts), cfg.evaluation.samples_per_prompt
    toxicity_term = (reward.terms[cfg.evaluation.term], cfg.evaluation.toxic_label)
    texts, responses, tox, total, judged = [], [], [], [], {j.name: [] for j in judges}
    for c, samples in enumerate(sample_chunks(n, draws, gen.rollout_batch_size)):
        _, chunk_responses = sample_chunk(policy, prompts, samples, c, cfg.run.seed, tokenizer, gen, device,
                                          synced_gpus)
        chunk_texts = [prompt_texts[s % n] for s in samples]
        scored = score_responses(reward, chunk_texts, chunk_responses, toxicity_term, judges)
        texts += chunk_texts
        responses += chunk_responses
        tox.append(scored.toxicity)
        total.append(scored.reward)
        for name, values in scored.judges.items():
            judged[name].append(values)
    toxicity, rewards = torch.cat(tox), torch.cat(total)
    judge_values = {name: torch.cat(v) for name, v in judged.items()}
    return {"toxicity_mean": toxicity.mean().item(), "toxicity_std": _std(toxicity),
            "reward_mean": rewards.mean().item(), "num_samples": len(responses), "num_prompts": n,
            "samples_per_prompt": draws,
            "toxicity_values": toxicity.tolist(), "reward_values": rewards.tolist(),
            "judges": {j.name: {"label": j.cfg.label, "threshold": j.cfg.threshold,
                                "mean": judge_values[j.name].mean().item(), "std": _std(judge_values[j.name]),
                                "values": judge_values[j.name].tolist()} for j in judges},
            "prompts": texts, "responses": responses,
            "samples": [{"prompt": p, "response": r, "toxicity": t}
                        for p, r, t in zip(texts[:8], responses[:8], toxicity[:8].tolist())]}


def compare_before_after(evaluation: dict[str, Any]) -> str:
    """Adds toxicity_change_pct to `evaluation` (which holds "before" and "after"); returns the printed summary."""
    b, a = evaluation["before"], evaluation["after"]
    evaluation["toxicity_change_pct"] = 100.0 * (a["toxicity_mean"] - b["toxicity_mean"]) / max(
        b["toxicity_mean"], 1e-12)
    draws = b.get("samples_per_prompt", 1)
    what = f"{b.get('num_prompts', b['num_samples'])} prompts" + (f" x {draws} samples" if draws > 1 else "")
    return (f"\nheld-out toxicity ({what}): before {b['toxicity_mean']:.4f} "
            f"(std {b['toxicity_std']:.4f})  after {a['toxicity_mean']:.4f} (std {a['toxicity_std']:.4f})  "
            f"change {evaluation['toxicity_change_pct']:+.1f}%\n"
            f"held-out mean reward: before {b['reward_mean']:.4f}  after {a['reward_mean']:.4f}"
            + "".join(f"\nheld-out judge {name} toxicity: before {j['mean']:.4f}  after "
                      f"{a['judges'][name]['mean']:.4f}" for name, j in b.get("judges", {}).items()))
