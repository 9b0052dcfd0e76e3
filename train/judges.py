"""Judges: toxicity classifiers that grade responses but are never trained against.

A policy optimised against one classifier can find that classifier's blind spots; a second classifier (another
architecture, tokenizer and training set) then disagrees. Each judge reuses the reward code (RewardTerm: its own
tokenizer, length-sorted batches, the response never cut away) and reports P(label) of the response alone.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from detoxrl.train.config import Config, JudgeConfig, RewardTermConfig
from detoxrl.train.reward import Deferred, RewardModel, RewardTerm, label_probability_from_logits

log = logging.getLogger("detoxrl.judges")


class Judge:
    """One judge classifier: `toxicity(texts)` is P(cfg.label) of each text scored alone."""

    def __init__(self, cfg: JudgeConfig, model_path: str, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.name = cfg.name or cfg.model
        term_cfg = RewardTermConfig(model=cfg.model, label=cfg.label, output="probability", batch_size=cfg.batch_size,
                                    max_length=cfg.max_length, score="response", tokenizer=cfg.tokenizer,
                                    trust_remote_code=cfg.trust_remote_code)
        try:
            self.term = RewardTerm(term_cfg, model_path, device, dtype)
        except ValueError as err:  # an unknown label names the valid ones
            raise ValueError(f"judge {self.name!r}: {err}") from err

    def toxicity(self, texts: Sequence[str]) -> torch.Tensor:
        return self.term.label_probability(list(texts), self.cfg.label)


def build_judges(cfgs: Sequence[JudgeConfig], resolve_path: Callable[[str, str], str], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> list[Judge]:
    """Every configured judge on `device`. `resolve_path` maps `demo`/hub names to a loadable path."""
    judges = [Judge(c, resolve_path(c.model, "judge"), device, dtype) for c in cfgs]
    for j in judges:
        log.info("judge %s: P(%s) of %s (index %d) on %s", j.name, j.cfg.label, j.cfg.model, j.term.label_index,
                 device)
    return judges


def reward_toxicity_term(reward: RewardModel, cfg: Config) -> Optional[RewardTerm]:
    """The reward term whose classifier measures toxicity (evaluation.term), if it has evaluation.toxic_label."""
    term = reward.terms[cfg.evaluation.term]
    return term if cfg.evaluation.toxic_label in term.config.id2label.values() else None


def submit_reward_toxicity(judges: list[Judge], tox_term, toxic_label: str, responses: list[str]) -> Deferred:
    """The reward classifier's own P(toxic) of the responses alone, which the judges are compared with (a Deferred:
    a scorer's term answers while the rank works on, with the step's other scorer requests); None without judges,
    or when the reward classifier has no toxic label."""
    if not judges or tox_term is None:
        return Deferred.done(None)
    pending = tox_term.submit_logits([""] * len(responses), responses, False)
    return Deferred(lambda: label_probability_from_logits(tox_term, pending.result(), toxic_label))


def judge_step(judges: list[Judge], reward_tox: Optional[torch.Tensor],
               responses: list[str]) -> tuple[dict[str, list[float]], Optional[list[float]]]:
    """Every judge's P(toxic) of this step's responses, and the reward classifier's own (`reward_tox`, from
    `submit_reward_toxicity`) as a list (None without judges, or when the reward classifier has no toxic label)."""
    if not judges:
        return {}, None
    judged = {j.name: j.toxicity(responses).tolist() for j in judges}
    return judged, reward_tox.tolist() if reward_tox is not None else None
