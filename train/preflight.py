"""Preflight: what a run reads before any weights load, checked, so that bad input fails in seconds, not minutes.

Reads only model configs (`AutoConfig`), tokenizer files and the data; never weights. Fails with a one-line
InputError (train/errors.py) naming the key, file (and line) or model, on:

- a model or tokenizer that cannot be found (a wrong path; a hub name not in the cache while the hub is out of reach);
- a reward label the classifier does not have (its config's `id2label`), and the same for `evaluation.toxic_label`
  and for each judge's label;
- a slow reward tokenizer (scoring needs character offsets);
- a `policy.adapter` folder without adapter_config.json;
- an unreadable data file (for JSON lines: the line), a missing split or column, no usable prompts;
- a prompt + response longer than a causal policy's window (training and held-out prompts).

The training loop calls `preflight` once in its setup and uses what it returns, so nothing is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from detoxrl.train import assets
from detoxrl.train.config import Config
from detoxrl.train.data import PromptSet, build_prompts, load_rows
from detoxrl.train.errors import InputError, InputNotFoundError, loading_model
from detoxrl.train.models import context_window, kind_of, load_tokenizer
from detoxrl.train.reward import resolve_label


@dataclass
class RunInputs:
    """What the preflight read; nothing here holds weights."""
    policy_path: str                   # loadable path of policy.model (`demo` resolved to the built asset)
    kind: str                          # seq2seq | causal
    tokenizer: PreTrainedTokenizerBase  # the policy's, as load_tokenizer prepares it
    prompts: PromptSet                 # training prompts (data.split), tokenized
    heldout: Optional[PromptSet]       # evaluation.split prompts when evaluation.before_after, else None


def preflight(cfg: Config) -> RunInputs:
    """Check every input of a run against the configs and the data; return what was read (see the module doc)."""
    p = cfg.policy
    policy_path = assets.resolve(p.model, "policy")
    with loading_model(p.model, "policy.model", p.revision):
        policy_config = AutoConfig.from_pretrained(policy_path, revision=p.revision,
                                                   trust_remote_code=p.trust_remote_code)
        kind = kind_of(policy_config) if p.kind == "auto" else p.kind
        tokenizer = load_tokenizer(policy_path, kind, p.revision, p.trust_remote_code)
    if p.adapter and not (Path(p.adapter) / "adapter_config.json").is_file():
        raise InputNotFoundError(f"policy.adapter: {p.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    check_reward_models(cfg)
    check_judges(cfg)

    data_path = assets.resolve(cfg.data.dataset, "data")
    prompts = build_prompts(load_rows(data_path, cfg.data.split), cfg.data, tokenizer, kind, cfg.run.seed)
    heldout = None
    if cfg.evaluation.before_after:
        heldout = build_prompts(load_rows(data_path, cfg.evaluation.split, "evaluation.split"), cfg.data, tokenizer,
                                kind, cfg.run.seed)
    window = context_window(policy_config) if kind == "causal" else None
    if window is not None:
        g = cfg.generation
        check_window(prompts, max(g.max_new_tokens, (g.max_new_tokens_range or [0, 0])[1]), window)
        if heldout is not None:  # the held-out budget: max_new_tokens, or the low end of its range (heldout.py)
            check_window(heldout, g.max_new_tokens_range[0] if g.max_new_tokens_range else g.max_new_tokens, window)
    return RunInputs(policy_path, kind, tokenizer, prompts, heldout)


def check_reward_models(cfg: Config) -> None:
    """Every reward term's config has its label, its tokenizer is fast; the toxicity classifier has its label."""
    for i, term in enumerate(cfg.reward.terms):
        path = assets.resolve(term.model, "reward")
        with loading_model(term.model, f"reward.terms.{i}.model"):
            labels = AutoConfig.from_pretrained(path, trust_remote_code=term.trust_remote_code).id2label
        check_label(labels, term.label, term.model, f"reward.terms.{i}.label")
        if cfg.evaluation.before_after and i == cfg.evaluation.term:
            check_label(labels, cfg.evaluation.toxic_label, term.model, "evaluation.toxic_label")
        tok_key = f"reward.terms.{i}.tokenizer" if term.tokenizer else f"reward.terms.{i}.model"
        with loading_model(term.tokenizer or term.model, tok_key):
            tokenizer = AutoTokenizer.from_pretrained(term.tokenizer or path, trust_remote_code=term.trust_remote_code)
        if not tokenizer.is_fast:
            raise InputError(f"{tok_key}: the tokenizer of {term.tokenizer or term.model!r} is not a fast tokenizer "
                             f"(scoring needs its character offsets to keep the response whole); use a model whose "
                             f"tokenizer.json exists, or set reward.terms.{i}.tokenizer to one")


def check_judges(cfg: Config) -> None:
    """Every judge's config has its label (judges are scored by label probability, so that is all they need)."""
    for i, judge in enumerate(cfg.judges):
        path = assets.resolve(judge.model, "judge")
        with loading_model(judge.model, f"judges.{i}.model"):
            labels = AutoConfig.from_pretrained(path, trust_remote_code=judge.trust_remote_code).id2label
        check_label(labels, judge.label, judge.model, f"judges.{i}.label")


def check_label(id2label: dict, label: str, model: str, key: str) -> None:
    try:
        resolve_label(id2label, label, model)
    except InputError as err:
        raise InputError(f"{key}: {err}") from err


def check_window(prompts: PromptSet, max_new: int, window: int) -> None:
    longest = max(len(ids) for ids in prompts.input_ids)
    if longest + max_new > window:
        raise InputError(f"prompt ({longest} tokens) + response ({max_new} tokens) exceeds the model's window of "
                         f"{window}; lower data.max_prompt_tokens or generation.max_new_tokens")
