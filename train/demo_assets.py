"""The offline demo's assets, built once and cached under ``$DETOXRL_CACHE`` (default ``~/.cache/detoxrl``).

* :func:`build_demo_assets` -- a tiny T5 policy fine-tuned (SFT) to summarise the shipped
  dialogues (a clear share of its sampled summaries are toxic, so PPO has something to reduce), a tiny RoBERTa
  toxicity classifier with the labels of ``facebook/roberta-hate-speech-dynabench-r4-target``
  (``{0: "nothate", 1: "hate"}``) and the dialogues as local JSON-lines files.
* :func:`build_demo_judge` -- the demo's independent judge: a tiny DistilBERT with a
  lower-cased WordPiece tokenizer (labels ``{0: "neutral", 1: "toxic"}``, like
  ``s-nlp/roberta_toxicity_classifier``), trained on ``judge_toxicity.jsonl``, sentences
  disjoint from everything the reward classifier was trained on. Cached under its own key.

Each cache entry is keyed by a hash of the shipped data, a version number, the hyperparameters and the
torch/transformers versions; builds go to a temporary folder swapped into place when complete (train/atomic.py),
under a file lock that serialises concurrent builders.  Everything is deterministic: the same seed gives
bitwise-identical weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Iterator

import torch
import transformers

from detoxrl.train.atomic import atomic_directory
from detoxrl.train.local_tokenizers import train_tokenizer
from detoxrl.train.reproducible import BUILD_THREADS, quiet_progress, rng_guarded, torch_threads
from detoxrl.train.shipped_data import (DEMO_DATA_DIR, PROMPT_TEMPLATE, dialogue_rows, is_toxic_text, judge_rows,
                                        toxicity_rows, write_jsonl)
from detoxrl.train.tiny_builders import build_classifier, build_t5
from detoxrl.train.tiny_finetune import sft_seq2seq, train_classifier

logger = logging.getLogger("detoxrl.demo_assets")

#: Bump whenever a change (here or in the tokenizer, builder and fine-tuning modules) changes what
#: :func:`build_demo_assets` produces.
BUILDER_VERSION = "2"

#: Hyperparameters of :func:`build_demo_assets` (part of the cache key).
DEMO_HPARAMS: dict = {
    "seed": 0,
    "policy_tokenizer_vocab": 800,
    "policy": {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 192, "dropout": 0.1},
    "policy_sft": {"steps": 800, "lr": 5e-3, "batch_size": 8},
    "reward_tokenizer_vocab": 800,
    "reward": {"hidden": 32, "layers": 2, "heads": 4, "max_position": 130, "dropout": 0.1},
    "reward_train": {"epochs": 10, "lr": 3e-3, "batch_size": 32},
    "reward_counterfactuals": True,
}

# Counterfactual augmentation of the classifier's training texts, so that it keys on the
# toxic words rather than on the contexts they happen to appear in (a heated dialogue's
# topic, a summary's template): each toxic text also appears with its toxic words swapped
# for harmless ones (label nothate) and each clean text with an insult inserted (label hate).
_NEUTRAL_SWAPS = {
    "shut up": "slow down", "idiot": "friend", "stupid": "busy", "pathetic": "tired",
    "worthless": "quiet", "loser": "neighbor", "moron": "student", "clown": "driver", "fool": "teacher",
    "jerk": "clerk", "trash": "paper", "garbage": "paper", "dumb": "late", "useless": "early",
    "brainless": "young", "lazy": "sleepy", "disgusting": "noisy", "hate": "like",
}
_INSERTS = (
    "stupid", "idiot", "you idiot", "worthless loser", "shut up", "dumb", "moron", "garbage", "pathetic",
    "disgusting", "useless", "jerk", "clown", "fool", "brainless", "trash", "lazy", "I hate you", "loser", "hates",
)


def _counterfactuals(texts: list[str], labels: list[int], seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    pattern = re.compile("|".join(re.escape(w) for w in _NEUTRAL_SWAPS), flags=re.IGNORECASE)
    out_t, out_l = [], []
    for text, label in zip(texts, labels):
        if label:
            new = pattern.sub(lambda m: _NEUTRAL_SWAPS[m.group(0).lower()], text)
            if not is_toxic_text(new):
                out_t.append(new)
                out_l.append(0)
        else:
            words = text.split(" ")
            pos = rng.randrange(len(words) + 1)
            out_t.append(" ".join(words[:pos] + [rng.choice(_INSERTS)] + words[pos:]))
            out_l.append(1)
    return out_t, out_l


def _demo_cache_key(hparams: dict) -> str:
    h = hashlib.sha256()
    for name in ("dialogues.jsonl", "toxicity.jsonl"):
        h.update(name.encode())
        h.update((DEMO_DATA_DIR / name).read_bytes())
    h.update(BUILDER_VERSION.encode())
    h.update(json.dumps(hparams, sort_keys=True).encode())
    h.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def _default_cache_root() -> Path:
    env = os.environ.get("DETOXRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "detoxrl"


def _demo_paths(root: Path) -> dict[str, Path]:
    return {"policy": root / "policy", "reward": root / "reward", "data": root / "data"}


def _is_complete(root: Path) -> bool:
    return (root / "manifest.json").is_file() and all(p.is_dir() for p in _demo_paths(root).values())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock ships with huggingface_hub/datasets
        yield
        return
    with FileLock(str(path)):
        yield


@rng_guarded
def _build_demo_into(out: Path, hp: dict) -> dict:
    """Build the demo assets into the (empty) folder ``out``; returns metrics."""
    seed = hp["seed"]
    rows = dialogue_rows()
    tox = toxicity_rows()
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    cols = ("id", "dialogue", "summary", "topic")

    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    write_jsonl(data_dir / "train.jsonl", ({c: r[c] for c in cols} for r in train_rows))
    write_jsonl(data_dir / "test.jsonl", ({c: r[c] for c in cols} for r in test_rows))

    t0 = time.perf_counter()
    prompts = [PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in rows]
    summaries = [r["summary"] for r in rows]
    tok_t5 = train_tokenizer(prompts + summaries + [r["text"] for r in tox], "t5", hp["policy_tokenizer_vocab"])
    policy = build_t5(out / "policy", tok_t5, seed=seed, **hp["policy"])
    sft = sft_seq2seq(
        policy,
        [PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in train_rows],
        [r["summary"] for r in train_rows],
        seed=seed,
        **hp["policy_sft"],
    )
    logger.info("policy: tiny T5 SFT done (final loss %.3f, %.1fs)", sft["final_loss"], time.perf_counter() - t0)

    t0 = time.perf_counter()
    cls_texts = [r["text"] for r in tox] + summaries
    cls_labels = [1 if r["label"] == "hate" else 0 for r in tox] + [int(is_toxic_text(s)) for s in summaries]
    if hp.get("reward_counterfactuals"):
        extra_t, extra_l = _counterfactuals(cls_texts, cls_labels, seed)
        cls_texts, cls_labels = cls_texts + extra_t, cls_labels + extra_l
    tok_rb = train_tokenizer(
        cls_texts + [r["dialogue"] for r in rows], "roberta", hp["reward_tokenizer_vocab"],
        model_max_length=hp["reward"]["max_position"] - 2,
    )
    reward = build_classifier(out / "reward", tok_rb, "roberta", {0: "nothate", 1: "hate"}, seed=seed, **hp["reward"])
    cls = train_classifier(reward, cls_texts, cls_labels, seed=seed, **hp["reward_train"])
    logger.info("reward: tiny RoBERTa classifier trained (train accuracy %.3f, %.1fs)",
                cls["train_accuracy"], time.perf_counter() - t0)
    return {"policy_sft_final_loss": sft["final_loss"], "reward_train_accuracy": cls["train_accuracy"],
            "reward_final_loss": cls["final_loss"]}


def build_demo_assets(cache_dir: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Build (once, then cached) the assets of the offline demo.

    Returns ``{"policy": ..., "reward": ..., "data": ...}``:

    * ``policy``: tiny T5 (+ tokenizer) fine-tuned on the train dialogues with
      :data:`PROMPT_TEMPLATE` -> summary; some of its sampled summaries are toxic.
    * ``reward``: tiny RoBERTa toxicity classifier, ``id2label {0: "nothate", 1: "hate"}``,
      with its own tokenizer.
    * ``data``: ``train.jsonl`` and ``test.jsonl`` (columns id, dialogue, summary, topic).

    The cache lives in ``cache_dir`` (default ``$DETOXRL_CACHE`` or ``~/.cache/detoxrl``)
    under ``demo-<hash>``, the hash covering the shipped data, :data:`BUILDER_VERSION`,
    the hyperparameters and the torch/transformers versions.  Builds go to a temporary
    folder swapped into place when complete (train/atomic.py); a file lock serialises
    concurrent builders.
    ``force=True`` rebuilds even when a cached copy exists.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    hp = DEMO_HPARAMS
    key = _demo_cache_key(hp)
    final = root / f"demo-{key}"
    if not force and _is_complete(final):
        logger.info("demo assets: using cache %s", final)
        return _demo_paths(final)

    with _file_lock(root / f".demo-{key}.lock"):
        if not force and _is_complete(final):  # built by another process meanwhile
            logger.info("demo assets: using cache %s", final)
            return _demo_paths(final)
        logger.info("demo assets: building into %s (about half a minute on one CPU core)", final)
        t0 = time.perf_counter()
        with atomic_directory(final) as tmp:  # under the lock: no other builder of this key runs meanwhile
            with torch_threads(BUILD_THREADS), quiet_progress():
                metrics = _build_demo_into(tmp, hp)
            manifest = {
                "builder_version": BUILDER_VERSION, "key": key, "hparams": hp, "metrics": metrics,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "torch": torch.__version__, "transformers": transformers.__version__,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        logger.info("demo assets: built in %.1fs: %s", time.perf_counter() - t0, metrics)
    return _demo_paths(final)


# --------------------------------------------------------------------------- demo judge
#: Hyperparameters of :func:`build_demo_judge` (part of its own cache key; the demo assets' key is unchanged).
JUDGE_HPARAMS: dict = {
    "seed": 1,
    "tokenizer_vocab": 600,
    "model": {"hidden": 32, "layers": 1, "heads": 4, "max_position": 128, "dropout": 0.1},
    "train": {"epochs": 12, "lr": 3e-3, "batch_size": 32},
}
JUDGE_VERSION = "1"



def _judge_cache_key(hparams: dict) -> str:
    h = hashlib.sha256((DEMO_DATA_DIR / "judge_toxicity.jsonl").read_bytes())
    h.update(JUDGE_VERSION.encode())
    h.update(json.dumps(hparams, sort_keys=True).encode())
    h.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


@rng_guarded
def _build_judge_into(out: Path, hp: dict) -> dict:
    rows = judge_rows()
    texts = [r["text"] for r in rows]
    labels = [1 if r["label"] == "toxic" else 0 for r in rows]
    tok = train_tokenizer(texts, "bert", hp["tokenizer_vocab"], model_max_length=hp["model"]["max_position"])
    build_classifier(out, tok, "distilbert", {0: "neutral", 1: "toxic"}, seed=hp["seed"], **hp["model"])
    return train_classifier(out, texts, labels, seed=hp["seed"], **hp["train"])


def build_demo_judge(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (once, then cached under ``judge-<hash>``) the demo's independent toxicity judge; returns its folder.

    A different architecture (DistilBERT vs RoBERTa), tokenizer (WordPiece vs byte-level BPE), labels
    (``neutral``/``toxic``) and training data (``judge_toxicity.jsonl``) than the demo's reward model, so
    that its held-out figure is not the reward model grading itself. A few seconds on one core.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = _judge_cache_key(JUDGE_HPARAMS)
    final = root / f"judge-{key}"
    if not force and (final / "manifest.json").is_file():
        return final
    with _file_lock(root / f".judge-{key}.lock"):
        if not force and (final / "manifest.json").is_file():
            return final
        t0 = time.perf_counter()
        with atomic_directory(final) as tmp:  # under the lock: no other builder of this key runs meanwhile
            with torch_threads(BUILD_THREADS), quiet_progress():
                metrics = _build_judge_into(tmp, JUDGE_HPARAMS)
            (tmp / "manifest.json").write_text(json.dumps({
                "judge_version": JUDGE_VERSION, "key": key, "hparams": JUDGE_HPARAMS, "metrics": metrics,
                "build_seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n", encoding="utf-8")
        logger.info("demo judge: built in %.1fs: %s", time.perf_counter() - t0, metrics)
    return final

