"""Tiny tokenizers trained locally with the conventions of each model family (T5, RoBERTa, GPT-2, BERT).

The merges are learnt by a small BPE trainer written here (:func:`_train_bpe`, WordPiece being BPE with a ``##``
continuation prefix) and then wrapped in ``tokenizers``/``transformers`` objects with each family's special tokens,
normaliser, pre-tokeniser, decoder and post-processor.

Why not the ``tokenizers`` library's own trainers (observed with tokenizers 0.23.3 on 2026-12-01, set up with the
same normalisers, pre-tokenisers, special tokens, alphabets and ``min_frequency=2`` as here):

* ``WordPieceTrainer`` is not deterministic.  On the judge's sentences at 600 tokens, three processes
  (PYTHONHASHSEED 1, 2, 3) gave three different vocabularies (fingerprints 2dec4e29, 94c350e1, a5bc2a1b; even the
  token sets differ: 425 to 428 tokens in common with ours), three processes with the same PYTHONHASHSEED=0 gave
  three more, and so did three trainings in one process (the randomness is the library's own, not Python's hash
  seed).  The demo judge's tokenizer, and so its figures, would change from one build to the next.
  ``tests/test_tiny_models.py::test_library_wordpiece_trainer_is_not_deterministic`` shows it.
* ``BpeTrainer`` is deterministic across processes (the same vocabulary and merges in all of the runs above), but
  it does not learn what this trainer learns: on the demo policy's corpus at 800 tokens the T5 vocabulary shares
  732 of 800 tokens with ours, 302 at the same id, and the merges differ; the RoBERTa one shares 748, 446 at the
  same id.  Switching would change the demo's policy and reward
  model, and so every shipped figure (README, benchmarks/RESULTS.md), and WordPiece would still need this trainer.
  ``test_library_bpe_trainer_differs_from_ours`` shows it.

So one hand-written trainer serves all four families; its ties are broken by the pair's strings, so the result never
depends on hashing order (two demo builds in two processes gave byte-identical tokenizer files).
"""
from __future__ import annotations

import heapq
import json
import string
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AddedToken, PreTrainedTokenizerFast

TOKENIZER_FAMILIES = ("t5", "roberta", "gpt2", "bert")

# always in the t5/bert alphabets, so ordinary ASCII text never maps to the unknown token
_ASCII = string.ascii_letters + string.digits + string.punctuation


# --------------------------------------------------------------------------- the BPE trainer
def _initial_words(word_counts: Counter, prefix: str | None) -> tuple[list[list[str]], list[int]]:
    """Words (sorted, so the order never depends on hashing) split into symbols, and their counts."""
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
    return words, counts


def _merge_pair(syms: list[str], a: str, b: str, merged: str) -> list[str]:
    """``syms`` with every adjacent ``a, b`` (left to right) replaced by ``merged``."""
    out, j = [], 0
    while j < len(syms):
        if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
            out.append(merged)
            j += 2
        else:
            out.append(syms[j])
            j += 1
    return out


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
    words, counts = _initial_words(word_counts, prefix)
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
            words[i] = out = _merge_pair(syms, a, b, merged)
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


# --------------------------------------------------------------------------- the families' conventions
def _pre_tokenizer(family: str) -> tuple[Tokenizer, list[str]]:
    """An empty tokenizer with the family's normaliser and pre-tokeniser, and the family's special tokens."""
    if family == "t5":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        return tok, ["<pad>", "</s>", "<unk>"]
    if family in ("roberta", "gpt2"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return tok, (["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if family == "roberta" else [])
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))  # bert
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _alphabet(family: str, counts: Counter) -> tuple[list[str], str | None]:
    """The initial symbols (sorted) and the continuation prefix (``"##"`` for WordPiece, else None)."""
    if family == "t5":
        return sorted({c for w in counts for c in w} | set(_ASCII) | {"\u2581"}), None
    if family in ("roberta", "gpt2"):
        return sorted(pre_tokenizers.ByteLevel.alphabet()), None
    chars = sorted({c for w in counts for c in w} | set(_ASCII.lower()))
    return chars + ["##" + c for c in chars], "##"


def _wrap(family: str, final: Tokenizer, vocab: dict[str, int], specials: list[str],
          model_max_length: int | None) -> PreTrainedTokenizerFast:
    """Add the family's decoder, post-processor and special tokens, and wrap for ``transformers``."""
    common = {"padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False}
    if family == "t5":
        final.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        final.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
        final.add_special_tokens(specials)
        return PreTrainedTokenizerFast(
            tokenizer_object=final, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
            model_max_length=model_max_length or 512, **common,
        )
    if family == "roberta":
        final.decoder = decoders.ByteLevel()
        final.post_processor = processors.RobertaProcessing(
            ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False
        )
        final.add_special_tokens(specials)
        return PreTrainedTokenizerFast(
            tokenizer_object=final, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
            unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
            model_max_length=model_max_length or 512, **common,
        )
    if family == "gpt2":
        final.decoder = decoders.ByteLevel()
        final.post_processor = processors.ByteLevel(trim_offsets=False)
        final.add_special_tokens(["<|endoftext|>"])
        return PreTrainedTokenizerFast(
            tokenizer_object=final, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", model_max_length=model_max_length or 1024, **common,
        )
    final.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    final.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=final, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length or 512, **common,
    )


# --------------------------------------------------------------------------- public
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

    tok, specials = _pre_tokenizer(family)
    counts = _pretokenize_counts(tok, texts)
    alphabet, prefix = _alphabet(family, counts)
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
    wrapped = _wrap(family, final, vocab, specials, model_max_length)
    if save_dir is not None:
        save_tokenizer(wrapped, Path(save_dir))
    return wrapped


def save_tokenizer(tokenizer, save_dir: Path, model_max_length: int | None = None) -> None:
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

