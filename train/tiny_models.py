"""Deterministic builders of tiny models, tokenizers and data sets.

Everything here runs offline on a CPU in seconds; nothing is downloaded.  Two
entry points matter to the rest of detoxrl:

* :func:`build_demo_assets` -- the assets of the offline demo: a tiny T5 policy
  fine-tuned (SFT) to summarise the shipped dialogues (a clear share of its
  sampled summaries are toxic, so PPO has something to reduce), a tiny RoBERTa
  toxicity classifier with the labels of ``facebook/roberta-hate-speech-dynabench-r4-target``
  (``{0: "nothate", 1: "hate"}``) and the dialogues as local JSON-lines files.
  Built once and cached under ``$DETOXRL_CACHE`` (default ``~/.cache/detoxrl``).
* :func:`build_test_models` -- tiny random stand-ins, saved as hub-like folders,
  for the models and data sets of the four recipes, for fast offline tests.

Tokenizers are trained with a small deterministic BPE trainer written here (the
vocabulary of the ``tokenizers`` WordPiece trainer was seen to change from one
process to the next) and are then wrapped in ``tokenizers``/``transformers``
objects with the special tokens and conventions of each model family.

Everything is deterministic: the same seed gives bitwise-identical weights (builds
run torch on one thread, which also keeps them fast when other processes compete
for the cores).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
import logging
import os
import random
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AddedToken, PreTrainedTokenizerFast

from detoxrl.train.atomic import atomic_directory

logger = logging.getLogger("detoxrl.tiny_models")

DEMO_DATA_DIR: Path = Path(__file__).resolve().parent / "demo_data"

#: Bump whenever a change here changes what :func:`build_demo_assets` produces.
BUILDER_VERSION = "2"

#: The prompt the demo policy is fine-tuned with (same wording as the recipes).
PROMPT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"

#: Words that make a text toxic in the shipped data (used to label summaries).
TOXIC_WORDS = (
    "idiot", "stupid", "pathetic", "worthless", "loser", "moron", "clown", "fool", "jerk",
    "trash", "garbage", "dumb", "useless", "brainless", "lazy", "disgusting", "hate", "shut up",
)

TOKENIZER_FAMILIES = ("t5", "roberta", "gpt2", "bert")

_BUILD_THREADS = 1  # deterministic, and immune to contention from other processes
# always in the t5/bert alphabets, so ordinary ASCII text never maps to the unknown token
_ASCII = string.ascii_letters + string.digits + string.punctuation


# --------------------------------------------------------------------------- utilities
def load_jsonl(path) -> list[dict]:
    """Read a JSON-lines file (blank lines ignored)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def is_toxic_text(text: str) -> bool:
    """Keyword rule that labels the shipped data (and helps to check the classifier)."""
    low = text.lower()
    return any(w in low for w in TOXIC_WORDS)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored on exit)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers/datasets progress bars (weight loading, saving) while building."""
    import datasets.utils.logging as ds_logging
    import transformers.utils.logging as tf_logging

    tf_on, ds_on = tf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if tf_on:
            tf_logging.enable_progress_bar()
        if ds_on:
            ds_logging.enable_progress_bar()


def _rng_guarded(fn):
    """Decorator: run ``fn`` under :func:`_rng_guard` (it seeds torch/random itself)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _rng_guard():
            return fn(*args, **kwargs)

    return wrapper


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _rng_guard() -> Iterator[None]:
    """Leave the caller's torch (CPU) and ``random`` generator states as they were."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)


# --------------------------------------------------------------------------- tokenizers
def _train_bpe(
    word_counts: Counter,
    alphabet: Sequence[str],
    n_merges: int,
    prefix: str | None = None,
    min_frequency: int = 2,
) -> tuple[list[str], list[tuple[str, str]]]:
    """A small deterministic BPE trainer.

    ``word_counts`` maps pre-tokenized words to counts; ``alphabet`` is the initial
    symbol set (sorted by the caller).  With ``prefix`` (WordPiece style, ``"##"``)
    every symbol but a word's first carries the prefix.  Ties are broken by the
    pair's strings, so the result never depends on hashing order.
    Returns (new tokens in merge order, merges).
    """
    words: list[list[str]] = []
    counts: list[int] = []
    for w in sorted(word_counts):
        if not w:
            continue
        syms = list(w)
        if prefix:
            syms = [syms[0]] + [prefix + c for c in syms[1:]]
        words.append(syms)
        counts.append(word_counts[w])

    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def add_word(i: int, sign: int) -> None:
        syms, c = words[i], counts[i]
        for a, b in zip(syms, syms[1:]):
            p = (a, b)
            pair_counts[p] = pair_counts.get(p, 0) + sign * c
            if sign > 0:
                where.setdefault(p, set()).add(i)

    for i in range(len(words)):
        add_word(i, +1)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    known = set(alphabet)
    new_tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        cur = pair_counts.get(pair, 0)
        if cur <= 0:
            continue
        if -negc != cur:  # stale entry: push the current count back
            heapq.heappush(heap, (-cur, pair))
            continue
        if cur < min_frequency:
            break
        a, b = pair
        merged = a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)
        merges.append(pair)
        if merged not in known:
            known.add(merged)
            new_tokens.append(merged)
        touched = set()
        for i in sorted(where.get(pair, ())):
            syms = words[i]
            if not any(x == a and y == b for x, y in zip(syms, syms[1:])):
                continue
            add_word(i, -1)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out
            add_word(i, +1)
            touched.update(zip(out, out[1:]))
        pair_counts.pop(pair, None)
        for p in sorted(touched):
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
    return new_tokens, merges


def _pretokenize_counts(tok: Tokenizer, texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
            counts[piece] += 1
    return counts


def train_tokenizer(
    texts: list[str],
    family: str,
    vocab_size: int = 800,
    save_dir: Path | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer on ``texts`` with the conventions of a model family.

    * ``"t5"``: Metaspace BPE; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended
      to every sequence; whitespace (newlines too) collapsed like SentencePiece.
    * ``"roberta"``: byte-level BPE; ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
      ``<mask>`` 4; ``<s> A </s>`` / ``<s> A </s></s> B </s>``.
    * ``"gpt2"``: byte-level BPE; ``<|endoftext|>`` (last id) is bos, eos and unk; no
      pad token and nothing added to encoded texts.
    * ``"bert"`` (also for DistilBERT): lower-cased WordPiece; ``[PAD]`` 0, ``[UNK]`` 1,
      ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4; ``[CLS] A [SEP]``.

    ``model_max_length`` defaults to 512 (1024 for gpt2).  With ``save_dir`` the
    tokenizer is saved there with ``save_pretrained`` (reloadable with ``AutoTokenizer``).
    Deterministic: the same texts give the same vocabulary and merges.
    """
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {TOKENIZER_FAMILIES}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")

    if family == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        counts = _pretokenize_counts(tok, texts)
        alphabet = sorted({c for w in counts for c in w} | set(_ASCII) | {"\u2581"})
        prefix = None
    elif family in ("roberta", "gpt2"):
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if family == "roberta" else []
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        counts = _pretokenize_counts(tok, texts)
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        prefix = None
    else:  # bert
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts = _pretokenize_counts(tok, texts)
        chars = sorted({c for w in counts for c in w} | set(_ASCII.lower()))
        alphabet = chars + ["##" + c for c in chars]
        prefix = "##"

    n_fixed = len(specials) + len(alphabet) + (1 if family == "gpt2" else 0)
    new_tokens, merges = _train_bpe(counts, alphabet, max(0, vocab_size - n_fixed), prefix=prefix)

    if family == "gpt2":
        ordered = list(alphabet) + new_tokens + ["<|endoftext|>"]
    else:
        ordered = specials + list(alphabet) + new_tokens
    vocab = {t: i for i, t in enumerate(ordered)}

    if family == "t5":
        model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>")
    elif family in ("roberta", "gpt2"):
        model = models.BPE(vocab=vocab, merges=merges)
    else:
        model = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    final = Tokenizer(model)
    final.normalizer = tok.normalizer
    final.pre_tokenizer = tok.pre_tokenizer

    common = {"padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False}
    if family == "t5":
        final.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        final.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
        final.add_special_tokens(specials)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=final, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
            model_max_length=model_max_length or 512, **common,
        )
    elif family == "roberta":
        final.decoder = decoders.ByteLevel()
        final.post_processor = processors.RobertaProcessing(
            ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False
        )
        final.add_special_tokens(specials)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=final, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
            unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
            model_max_length=model_max_length or 512, **common,
        )
    elif family == "gpt2":
        final.decoder = decoders.ByteLevel()
        final.post_processor = processors.ByteLevel(trim_offsets=False)
        final.add_special_tokens(["<|endoftext|>"])
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=final, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", model_max_length=model_max_length or 1024, **common,
        )
    else:
        final.decoder = decoders.WordPiece(prefix="##")
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        final.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        final.add_special_tokens(specials)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=final, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length or 512, **common,
        )
    if save_dir is not None:
        _save_tokenizer(wrapped, Path(save_dir))
    return wrapped


def _save_tokenizer(tokenizer, save_dir: Path, model_max_length: int | None = None) -> None:
    """``save_pretrained`` plus two touches to tokenizer_config.json: model_max_length capped
    at what the model takes, and tokenizer_class "PreTrainedTokenizerFast" (transformers 5
    writes "TokenizersBackend", which transformers 4 cannot load; 5 reads both the same)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    cfg_path = save_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    old = cfg.get("model_max_length")
    if model_max_length is not None and (not isinstance(old, (int, float)) or old > model_max_length):
        cfg["model_max_length"] = int(model_max_length)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- models
@_rng_guarded
def build_t5(
    save_dir,
    tokenizer,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
    dropout: float = 0.1,
    initializer_factor: float = 1.0,
) -> Path:
    """A randomly initialised tiny T5ForConditionalGeneration (flan-t5 style: gated-gelu,
    untied lm_head, relative attention), saved with its tokenizer and generation config.

    With T5's default init (factor 1.0) an untrained tiny T5 puts all its mass on one token (it samples only
    <pad>); untrained test models use a small factor so their samples are diverse."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=dropout, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        is_encoder_decoder=True, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
        initializer_factor=initializer_factor,
    )
    _seed_all(seed)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(str(save_dir))
    _save_tokenizer(tokenizer, save_dir)
    return save_dir


@_rng_guarded
def build_gpt2(
    save_dir,
    tokenizer,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
    dropout: float = 0.1,
) -> Path:
    """A randomly initialised tiny GPT2LMHeadModel saved with its tokenizer."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )
    _seed_all(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id)
    model.save_pretrained(str(save_dir))
    _save_tokenizer(tokenizer, save_dir, model_max_length=n_positions)
    return save_dir


@_rng_guarded
def build_classifier(
    save_dir,
    tokenizer,
    family: str,
    id2label: dict[int, str],
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_position: int = 130,
    seed: int = 0,
    dropout: float = 0.1,
) -> Path:
    """A randomly initialised tiny sequence classifier (``"roberta"`` or ``"distilbert"``)
    with ``config.id2label``/``label2id`` set, saved with its tokenizer (whose
    model_max_length is capped to what the position embeddings allow)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    id2label = {int(k): str(v) for k, v in id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    if family == "roberta":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1
        # RoBERTa position ids start at pad_id + 1
        max_len = max_position - pad_id - 1
        if max_len < 1:
            raise ValueError(f"max_position={max_position} too small for pad id {pad_id}")
        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max_position, type_vocab_size=1,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            id2label=id2label, label2id=label2id,
        )
        cls = RobertaForSequenceClassification
    elif family == "distilbert":
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        max_len = max_position
        config = DistilBertConfig(
            vocab_size=len(tokenizer), dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden,
            max_position_embeddings=max_position, dropout=dropout, attention_dropout=dropout,
            seq_classif_dropout=dropout, pad_token_id=pad_id, id2label=id2label, label2id=label2id,
        )
        cls = DistilBertForSequenceClassification
    else:
        raise ValueError(f"unknown classifier family {family!r}; expected 'roberta' or 'distilbert'")
    _seed_all(seed)
    model = cls(config)
    model.save_pretrained(str(save_dir))
    _save_tokenizer(tokenizer, save_dir, model_max_length=max_len)
    return save_dir


# --------------------------------------------------------------------------- training
def _batches(n: int, batch_size: int, gen: torch.Generator, steps: int | None = None) -> Iterator[list[int]]:
    """Shuffled mini-batches of indices; epoch after epoch (``steps`` batches) or one epoch."""
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size]
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None:
            return


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@_rng_guarded
def train_classifier(
    model_dir,
    texts: list[str],
    labels: list[int],
    epochs: int = 30,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 64,
) -> dict:
    """Fine-tune the classifier saved in ``model_dir`` in place (CPU, plain torch loop,
    deterministic for a given seed); returns ``{"train_accuracy", "final_loss"}``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(texts) != len(labels) or not texts:
        raise ValueError("texts and labels must be non-empty and of the same length")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _seed_all(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    enc = tok(list(texts), truncation=True, max_length=max_length)
    y = torch.tensor([int(v) for v in labels], dtype=torch.long)

    def collate(idx):
        return tok.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                        "attention_mask": [enc["attention_mask"][i] for i in idx]}, return_tensors="pt")

    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, total // 10)))
    model.train()
    losses = []
    for idx in _batches(len(texts), batch_size, gen, steps=total):
        batch = collate(idx)
        out = model(**batch, labels=y[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            idx = list(range(i, min(i + 128, len(texts))))
            pred = model(**collate(idx)).logits.argmax(-1)
            correct += int((pred == y[idx]).sum())
    model.save_pretrained(str(model_dir))
    tail = losses[-steps_per_epoch:]
    return {"train_accuracy": correct / len(texts), "final_loss": sum(tail) / len(tail), "steps": total}


def _fine_tune(model, model_dir: Path, n_examples: int, collate, steps: int, lr: float, batch_size: int,
               seed: int) -> dict:
    """The SFT loop shared by the seq2seq and causal builders: AdamW, warmup + decay, clipping; saves in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    model.train()
    losses = []
    for idx in _batches(n_examples, batch_size, gen, steps=steps):
        ids, mask, lab = collate(idx)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(model_dir))
    tail = losses[-max(1, min(20, len(losses))):]
    return {"final_loss": sum(tail) / len(tail), "steps": steps}


@_rng_guarded
def sft_seq2seq(
    model_dir,
    sources: list[str],
    targets: list[str],
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_source_length: int = 256,
    max_target_length: int = 64,
) -> dict:
    """Supervised fine-tuning of the seq2seq model in ``model_dir`` in place (teacher
    forcing, cross-entropy on the targets); returns ``{"final_loss"}``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if len(sources) != len(targets) or not sources:
        raise ValueError("sources and targets must be non-empty and of the same length")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _seed_all(seed)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    src = tok(list(sources), truncation=True, max_length=max_source_length)["input_ids"]
    tgt = tok(list(targets), truncation=True, max_length=max_target_length)["input_ids"]
    pad = tok.pad_token_id

    def collate(idx):
        s = [src[i] for i in idx]
        t = [tgt[i] for i in idx]
        ls, lt = max(map(len, s)), max(map(len, t))
        ids = torch.full((len(idx), ls), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), ls), dtype=torch.long)
        lab = torch.full((len(idx), lt), -100, dtype=torch.long)
        for k, (a, b) in enumerate(zip(s, t)):
            ids[k, : len(a)] = torch.tensor(a)
            mask[k, : len(a)] = 1
            lab[k, : len(b)] = torch.tensor(b)
        return ids, mask, lab

    return _fine_tune(model, model_dir, len(sources), collate, steps, lr, batch_size, seed)


@_rng_guarded
def sft_causal(
    model_dir,
    texts: list[str],
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
) -> dict:
    """Language-model fine-tuning of the causal LM in ``model_dir`` in place (each text
    followed by eos); returns ``{"final_loss"}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("texts must be non-empty")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _seed_all(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    eos = tok.eos_token_id
    ids_all = [x[: max_length - 1] + [eos] for x in tok(list(texts))["input_ids"]]

    def collate(idx):
        seqs = [ids_all[i] for i in idx]
        n = max(map(len, seqs))
        ids = torch.full((len(idx), n), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        lab = torch.full((len(idx), n), -100, dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s)
            mask[k, : len(s)] = 1
            lab[k, : len(s)] = torch.tensor(s)
        return ids, mask, lab

    return _fine_tune(model, model_dir, len(ids_all), collate, steps, lr, batch_size, seed)


# --------------------------------------------------------------------------- demo assets
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


def _dialogue_rows() -> list[dict]:
    return load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")


def _toxicity_rows() -> list[dict]:
    return load_jsonl(DEMO_DATA_DIR / "toxicity.jsonl")


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


@_rng_guarded
def _build_demo_into(out: Path, hp: dict) -> dict:
    """Build the demo assets into the (empty) folder ``out``; returns metrics."""
    seed = hp["seed"]
    rows = _dialogue_rows()
    tox = _toxicity_rows()
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    cols = ("id", "dialogue", "summary", "topic")

    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    _write_jsonl(data_dir / "train.jsonl", ({c: r[c] for c in cols} for r in train_rows))
    _write_jsonl(data_dir / "test.jsonl", ({c: r[c] for c in cols} for r in test_rows))

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
            with _torch_threads(_BUILD_THREADS), _quiet_progress():
                metrics = _build_demo_into(tmp, hp)
            manifest = {
                "builder_version": BUILDER_VERSION, "key": key, "hparams": hp, "metrics": metrics,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "torch": torch.__version__, "transformers": transformers.__version__,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        logger.info("demo assets: built in %.1fs: %s", time.perf_counter() - t0, metrics)
    return _demo_paths(final)


# --------------------------------------------------------------------------- test models
_REVIEW_POS_OPEN = [
    "I loved this movie.", "What a wonderful film.", "This was a great movie.", "A truly fun film.",
    "One of the best movies I have seen this year.", "I enjoyed every minute of it.",
]
_REVIEW_NEG_OPEN = [
    "I did not like this movie.", "What a boring film.", "This was a bad movie.", "A truly dull film.",
    "One of the worst movies I have seen this year.", "I wanted to leave after ten minutes.",
]
_REVIEW_POS_BODY = [
    "The actors were brilliant and the story kept me interested until the end.",
    "The music was beautiful and the jokes were really funny.",
    "The director made every scene look amazing.",
    "My whole family laughed and cried at the same time.",
    "The ending was clever and surprising.",
]
_REVIEW_NEG_BODY = [
    "The actors looked tired and the story made no sense at all.",
    "The music was too loud and the jokes were not funny.",
    "Every scene was too long and nothing happened.",
    "My friends fell asleep before the middle of the film.",
    "The ending was silly and easy to guess.",
]
_REVIEW_TAIL = [
    "", "", " I watched it with my brother on a rainy Sunday afternoon and we talked about it for hours afterwards.",
    " The cinema was full and the popcorn was cold, but that did not change my opinion of the film.",
]


def _make_imdb_rows(n: int = 100, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = len(rows) % 2
        opens, bodies = (_REVIEW_POS_OPEN, _REVIEW_POS_BODY) if label else (_REVIEW_NEG_OPEN, _REVIEW_NEG_BODY)
        b1, b2 = rng.sample(bodies, 2)
        text = f"{rng.choice(opens)} {b1} {b2}{rng.choice(_REVIEW_TAIL)}"
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label})
    return rows


@_rng_guarded
def build_test_models(root: Path) -> dict[str, Path]:
    """Tiny random stand-ins (no training, a few seconds) for the recipes' models and data.

    Returns folder paths keyed ``t5``, ``gpt2``, ``roberta_hate``, ``roberta_cola``,
    ``roberta_sentiment``, ``distilbert_imdb``, ``dialogsum`` (a ``DatasetDict`` saved
    with ``save_to_disk``: train/validation/test), ``imdb`` (``train.parquet`` and
    ``test.parquet``: text, label) and ``t5_sft_adapter`` (a PEFT LoRA adapter for ``t5``
    with non-zero ``lora_B``).
    """
    import datasets
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    rows = _dialogue_rows()
    tox = _toxicity_rows()
    imdb = _make_imdb_rows(100, seed)
    corpus = (
        [PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in rows]
        + [r["summary"] for r in rows] + [r["text"] for r in tox] + [r["text"] for r in imdb]
    )
    out: dict[str, Path] = {}
    with _torch_threads(_BUILD_THREADS), _quiet_progress():
        tok_t5 = train_tokenizer(corpus, "t5", 800)
        tok_gpt2 = train_tokenizer(corpus, "gpt2", 800)
        tok_rb = train_tokenizer(corpus, "roberta", 800)
        tok_bert = train_tokenizer(corpus, "bert", 800)

        out["t5"] = build_t5(root / "t5", tok_t5, seed=seed, initializer_factor=0.05)
        out["gpt2"] = build_gpt2(root / "gpt2", tok_gpt2, n_positions=1024, seed=seed)
        out["roberta_hate"] = build_classifier(
            root / "roberta_hate", tok_rb, "roberta", {0: "nothate", 1: "hate"}, max_position=514, seed=seed)
        out["roberta_cola"] = build_classifier(
            root / "roberta_cola", tok_rb, "roberta", {0: "LABEL_0", 1: "LABEL_1"}, max_position=514, seed=seed + 1)
        out["roberta_sentiment"] = build_classifier(
            root / "roberta_sentiment", tok_rb, "roberta", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"},
            max_position=514, seed=seed + 2)
        out["distilbert_imdb"] = build_classifier(
            root / "distilbert_imdb", tok_bert, "distilbert", {0: "NEGATIVE", 1: "POSITIVE"},
            max_position=512, seed=seed + 3)

        cols = ("id", "dialogue", "summary", "topic")
        train_rows = [{c: r[c] for c in cols} for r in rows if r["split"] == "train"]
        test_rows = [{c: r[c] for c in cols} for r in rows if r["split"] == "test"]
        n_val = max(1, len(train_rows) // 10)
        dsd = datasets.DatasetDict({
            "train": datasets.Dataset.from_list(train_rows[:-n_val]),
            "validation": datasets.Dataset.from_list(train_rows[-n_val:]),
            "test": datasets.Dataset.from_list(test_rows),
        })
        out["dialogsum"] = root / "dialogsum"
        dsd.save_to_disk(str(out["dialogsum"]))

        out["imdb"] = root / "imdb"
        out["imdb"].mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(imdb[:50]).to_parquet(str(out["imdb"] / "train.parquet"))
        datasets.Dataset.from_list(imdb[50:]).to_parquet(str(out["imdb"] / "test.parquet"))

        base = AutoModelForSeq2SeqLM.from_pretrained(str(out["t5"]))
        lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q", "v"],
                          task_type=TaskType.SEQ_2_SEQ_LM)
        peft_model = get_peft_model(base, lora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(peft_model.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 2.0)  # large: the untrained base is small-scale
        out["t5_sft_adapter"] = root / "t5_sft_adapter"
        peft_model.save_pretrained(str(out["t5_sft_adapter"]))
    return out
