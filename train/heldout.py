"""The trainer's held-out evaluation (evaluation.before_after): the same prompts sampled with a fixed seed before
and after training, through the generate-decode-score path of train/experience.py that detoxrl-eval uses too.

detoxrl-eval (eval/evaluate.py) keeps its own loop around that path: it compares several policies on seeded
chunks spread over ranks, with KL to a baseline and intervals; this one samples every prompt at once on each rank
with one seed, so the trainer's figures stay what they were.
"""

from __future__ import annotations

from typing import Any

import torch

from detoxrl.train.config import Config
from detoxrl.train.experience import sample_responses, score_responses
from detoxrl.train.judges import Judge
from detoxrl.train.reward import RewardModel

# the held-out seed is run.seed + this: evaluation does not disturb the training RNG (it samples in a forked one)
SEED_OFFSET = 12345


def _std(values: torch.Tensor) -> float:
    return values.std().item() if len(values) > 1 else 0.0


def heldout_evaluation(policy, tokenizer, prompts: list[list[int]], prompt_texts: list[str], reward: RewardModel,
                       cfg: Config, device: torch.device, synced_gpus: bool = False,
                       judges: tuple[Judge, ...] | list[Judge] = ()) -> dict[str, Any]:
    """Mean toxicity (the reward's classifier and every judge) and reward of held-out responses, sampled with a
    fixed seed (does not disturb training RNG). Per-response values are kept, for intervals (detoxrl-eval compare)."""
    _, responses = sample_responses(policy, prompts, tokenizer, cfg.generation, cfg.generation.max_new_tokens, device,
                                    synced_gpus, seed=cfg.run.seed + SEED_OFFSET)
    scored = score_responses(reward, prompt_texts, responses,
                             (reward.terms[cfg.evaluation.term], cfg.evaluation.toxic_label), judges)
    toxicity, total = scored.toxicity, scored.reward
    return {"toxicity_mean": toxicity.mean().item(), "toxicity_std": _std(toxicity),
            "reward_mean": total.mean().item(), "num_samples": len(responses),
            "toxicity_values": toxicity.tolist(), "reward_values": total.tolist(),
            "judges": {j.name: {"label": j.cfg.label, "threshold": j.cfg.threshold, "mean": v.mean().item(),
                                "std": _std(v), "values": v.tolist()}
                       for j, v in zip(judges, scored.judges.values())},
            "prompts": prompt_texts, "responses": responses,
            "samples": [{"prompt": p, "response": r, "toxicity": t}
                        for p, r, t in zip(prompt_texts[:8], responses[:8], toxicity[:8].tolist())]}


def compare_before_after(evaluation: dict[str, Any]) -> str:
    """Adds toxicity_change_pct to `evaluation` (which holds "before" and "after"); returns the printed summary."""
    b, a = evaluation["before"], evaluation["after"]
    evaluation["toxicity_change_pct"] = 100.0 * (a["toxicity_mean"] - b["toxicity_mean"]) / max(
        b["toxicity_mean"], 1e-12)
    return (f"\nheld-out toxicity ({b['num_samples']} prompts): before {b['toxicity_mean']:.4f} "
            f"(std {b['toxicity_std']:.4f})  after {a['toxicity_mean']:.4f} (std {a['toxicity_std']:.4f})  "
            f"change {evaluation['toxicity_change_pct']:+.1f}%\n"
            f"held-out mean reward: before {b['reward_mean']:.4f}  after {a['reward_mean']:.4f}"
            + "".join(f"\nheld-out judge {name} toxicity: before {j['mean']:.4f}  after "
                      f"{a['judges'][name]['mean']:.4f}" for name, j in b.get("judges", {}).items()))
