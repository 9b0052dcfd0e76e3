"""Frozen classifier rewards: one or more weighted terms, each scored on its own device with its own tokenizer.

The seeds' bug never to repeat: they padded prompts to 512 tokens and then truncated prompt+response to 512
before scoring, so the response was cut away and every reward was identical. Here the text is re-tokenized with
the classifier's own tokenizer and, when the prompt is scored too, tokens are dropped from the LEFT of the prompt
until it fits; the response is only ever truncated when it alone is longer than the classifier's window.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from detoxrl.train.config import RewardTermConfig
from detoxrl.train.errors import InputError, loading_model

log = logging.getLogger("detoxrl.reward")


def resolve_label(id2label: dict, name: str, model_name: str) -> int:
    """Index of the label called `name` in the model's `id2label`; an unknown name lists the valid ones."""
    for idx, label in id2label.items():
        if label == name:
            return int(idx)
    valid = ", ".join(repr(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0])))
    raise InputError(f"reward model {model_name!r} has no label {name!r}; its labels are: {valid}")


def fit_to_window(ids: list[int], offsets: list[tuple[int, int]], special: list[int], response_start: int,
                  max_length: int) -> tuple[list[int], bool]:
    """Cut one encoded text (special tokens included) to `max_length` tokens.

    Content tokens whose character offset starts before `response_start` belong to the prompt and are dropped
    from the left first; only if the response alone does not fit is it cut (from the right). Returns the kept
    ids and whether the response itself was truncated.
    """
    if len(ids) <= max_length:
        return ids, False
    content = [i for i, s in enumerate(special) if not s]
    if not content:
        return ids[:max_length], False
    lead = ids[:content[0]]
    trail = ids[content[-1] + 1:]
    body = [ids[i] for i in content]
    body_offsets = [offsets[i] for i in content]
    budget = max_length - len(lead) - len(trail)
    n_prompt = sum(1 for (start, end) in body_offsets if start < response_start)
    n_drop = len(body) - budget
    if n_drop <= n_prompt:
        return lead + body[n_drop:] + trail, False
    response = body[n_prompt:][:budget]
    return lead + response + trail, True


class RewardTerm:
    """One frozen sequence classifier on its own device, returning the logit or probability of one label."""

    def __init__(self, cfg: RewardTermConfig, model_path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.name = cfg.model
        tok_path = cfg.tokenizer or model_path
        with loading_model(tok_path):
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code)
        if not self.tokenizer.is_fast:
            raise InputError(f"reward tokenizer {tok_path!r} must be a fast tokenizer (offsets are needed to keep "
                             "the response when cutting the prompt)")
        with loading_model(model_path):
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.label_index = resolve_label(self.model.config.id2label, cfg.label, cfg.model)
        limit = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else 512
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and getattr(self.model.config, "model_type", "") in ("roberta", "xlm-roberta",
                                                                                      "camembert"):
            positions -= self.tokenizer.pad_token_id + 1  # RoBERTa's positions start after the pad index
        if positions is not None:
            limit = min(limit, positions)
        self.max_length = min(cfg.max_length, limit) if cfg.max_length else limit
        self._warned = False

    def encode(self, prompts: list[str], responses: list[str], with_prompt: bool) -> list[list[int]]:
        texts = [p + r for p, r in zip(prompts, responses)] if with_prompt else list(responses)
        starts = [len(p) for p in prompts] if with_prompt else [0] * len(responses)
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                             return_special_tokens_mask=True, truncation=False, verbose=False)
        out = []
        for i in range(len(texts)):
            ids, cut = fit_to_window(enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i],
                                     starts[i], self.max_length)
            if cut and not self._warned:
                log.warning("reward %s: a response is longer than the classifier's window (%d tokens); scoring its "
                            "first part only", self.name, self.max_length)
                self._warned = True
            out.append(ids)
        return out

    @property
    def config(self):
        """The classifier's model config (labels, problem type): what a remote term reads from the hub config."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def logits(self, prompts: list[str], responses: list[str], with_prompt: bool,
               max_batch_tokens: Optional[int] = None) -> torch.Tensor:
        """Classifier logits (N, num_labels), float32 on CPU, in input order; batches sorted by length, of
        `cfg.batch_size` texts, or (with `max_batch_tokens`, the scorers' packing) of up to that many padded tokens."""
        encoded = self.encode(prompts, responses, with_prompt)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), self.model.config.num_labels, dtype=torch.float32)
        bs = self.cfg.batch_size
        spans = token_budget_batches([len(encoded[i]) for i in order], max_batch_tokens) if max_batch_tokens \
            else [(s, min(s + bs, len(order))) for s in range(0, len(order), bs)]
        for start, end in spans:
            idx = order[start:end]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits
            out[torch.tensor(idx)] = logits.float().cpu()
        return out

    def submit_logits(self, prompts: list[str], responses: list[str], with_prompt: bool) -> "Deferred":
        """`logits`, computed now (a scorer's remote term returns its answer later through the same interface)."""
        return Deferred.done(self.logits(prompts, responses, with_prompt))

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """This term's score (N,): the configured label's logit or probability."""
        return term_score(self, self.logits(prompts, responses, self.cfg.score == "prompt_response"))

    def label_probability(self, texts: list[str], label: str) -> torch.Tensor:
        """P(label) of each text scored alone: evaluation's toxicity (see `label_probability_from_logits`)."""
        return label_probability_from_logits(self, self.logits([""] * len(texts), texts, with_prompt=False), label)


def term_score(term, logits: torch.Tensor) -> torch.Tensor:
    """A term's score (N,) from its logits: the configured label's logit or probability (`term`: a RewardTerm or a
    scorer's remote term: `.cfg`, `.label_index`)."""
    if term.cfg.output == "probability":
        return logits.softmax(-1)[:, term.label_index]
    return logits[:, term.label_index]


def label_probability_from_logits(term, logits: torch.Tensor, label: str) -> torch.Tensor:
    """P(label) per text: softmax over the labels, or the label's own sigmoid for a multi-label model
    (`problem_type: multi_label_classification`, e.g. unitary/toxic-bert, whose six labels are independent yes/no
    outputs)."""
    index = resolve_label(term.config.id2label, label, term.name)
    if getattr(term.config, "problem_type", None) == "multi_label_classification":
        return logits[:, index].sigmoid()
    return logits.softmax(-1)[:, index]


def token_budget_batches(sorted_lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """(start, end) spans over texts sorted by length (ascending): each batch as many texts as fit in `max_tokens`
    padded tokens (rows x the longest), at least one text."""
    spans, start = [], 0
    for i, n in enumerate(sorted_lengths):
        if i > start and (i - start + 1) * n > max_tokens:
            spans.append((start, i))
            start = i
    if sorted_lengths:
        spans.append((start, len(sorted_lengths)))
    return spans


class Deferred:
    """A result that may still be on its way (a scorer's answer); `result()` waits for it once and keeps it."""

    def __init__(self, finish: Callable[[], Any]) -> None:
        self._finish, self._done, self._value = finish, False, None

    @classmethod
    def done(cls, value: Any) -> "Deferred":
        d = cls(lambda: value)
        d.result()
        return d

    def result(self) -> Any:
        if not self._done:
            self._value, self._done = self._finish(), True
            self._finish = None
        return self._value


class RewardModel:
    """The weighted sum of several RewardTerms."""

    def __init__(self, terms: list[RewardTerm]) -> None:
        if not terms:
            raise ValueError("reward needs at least one term")
        self.terms = terms

    def score(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(total (N,), [term_i scores (N,)]) on CPU float32. Non-finite scores are an error, never a silent 0."""
        return self.submit(prompts, responses).result()

    def submit(self, prompts: list[str], responses: list[str]) -> Deferred:
        """`score`, as a Deferred: local terms score now, a scorer's terms answer while the caller works on."""
        pending = [t.submit_logits(prompts, responses, t.cfg.score == "prompt_response") for t in self.terms]

        def finish() -> tuple[torch.Tensor, list[torch.Tensor]]:
            per_term = [term_score(t, p.result()) for t, p in zip(self.terms, pending)]
            total = torch.zeros(len(responses), dtype=torch.float32)
            for t, s in zip(self.terms, per_term):
                if not torch.isfinite(s).all():
                    raise FloatingPointError(f"reward term {t.name!r} produced non-finite scores")
                total += t.cfg.weight * s
            return total, per_term

        return Deferred(finish)


def build_reward(terms_cfg: list[RewardTermConfig], resolve_path, devices: list[torch.device],
                 dtypes: list[torch.dtype]) -> RewardModel:
    """Load every term on its own device in its dtype. `resolve_path` maps `demo`/hub names to a loadable path."""
    terms = []
    for cfg, dev, dtype in zip(terms_cfg, devices, dtypes, strict=True):
        terms.append(RewardTerm(cfg, resolve_path(cfg.model, "reward"), dev, dtype))
        log.info("reward term %s label %s (%s, index %d) on %s (%s), window %d tokens", cfg.model, cfg.label,
                 cfg.output, terms[-1].label_index, dev, dtype, terms[-1].max_length)
    return RewardModel(terms)
