"""Tiny random stand-ins, saved as hub-like folders, for the models and data sets of the four recipes.

No training, a few seconds: the tests (tests/conftest.py's ``test_models``) and benchmarks/checkpoint_cost.py run
the recipes offline on them.  Not test-only, so it lives here rather than under tests/.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from detoxrl.train.local_tokenizers import train_tokenizer
from detoxrl.train.reproducible import BUILD_THREADS, quiet_progress, rng_guarded, torch_threads
from detoxrl.train.shipped_data import PROMPT_TEMPLATE, dialogue_rows, toxicity_rows
from detoxrl.train.tiny_builders import build_classifier, build_gpt2, build_t5

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


def make_imdb_rows(n: int = 100, seed: int = 0) -> list[dict]:
    """``n`` distinct short film reviews from templates, alternately negative (0) and positive (1): an offline
    stand-in for the IMDb data set."""
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


@rng_guarded
def build_test_models(root: Path) -> dict[str, Path]:
    """Tiny random stand-ins (no training, a few seconds) for the recipes' models and data.

    Returns folder paths keyed ``t5``, ``gpt2``, ``roberta_hate``, ``roberta_cola``,
    ``roberta_sentiment``, ``distilbert_imdb``, ``bert_toxic`` (unitary/toxic-bert's six multi-label outputs),
    ``roberta_toxicity`` (s-nlp/roberta_toxicity_classifier's neutral/toxic), ``dialogsum`` (a ``DatasetDict`` saved
    with ``save_to_disk``: train/validation/test), ``imdb`` (``train.parquet`` and
    ``test.parquet``: text, label) and ``t5_sft_adapter`` (a PEFT LoRA adapter for ``t5``
    with non-zero ``lora_B``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    rows = dialogue_rows()
    tox = toxicity_rows()
    imdb = make_imdb_rows(100, seed)
    corpus = (
        [PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in rows]
        + [r["summary"] for r in rows] + [r["text"] for r in tox] + [r["text"] for r in imdb]
    )
    out: dict[str, Path] = {}
    with torch_threads(BUILD_THREADS), quiet_progress():
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
        out["bert_toxic"] = build_classifier(
            root / "bert_toxic", tok_bert, "distilbert", dict(enumerate(
                ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"])),
            max_position=512, seed=seed + 4, problem_type="multi_label_classification")
        out["roberta_toxicity"] = build_classifier(
            root / "roberta_toxicity", tok_rb, "roberta", {0: "neutral", 1: "toxic"}, max_position=514, seed=seed + 5)

        _save_datasets(root, rows, imdb, out)
        out["t5_sft_adapter"] = _save_sft_adapter(out["t5"], root / "t5_sft_adapter", seed)
    return out


def _save_datasets(root: Path, rows: list[dict], imdb: list[dict], out: dict[str, Path]) -> None:
    """The dialogues as a ``DatasetDict`` (train/validation/test) and the reviews as parquet files."""
    import datasets

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


def _save_sft_adapter(t5_dir: Path, save_dir: Path, seed: int) -> Path:
    """A PEFT LoRA adapter for the T5 in ``t5_dir`` with large non-zero ``lora_B``, so that it changes the logits."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(str(t5_dir))
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q", "v"],
                      task_type=TaskType.SEQ_2_SEQ_LM)
    peft_model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)  # large: the untrained base is small-scale
    peft_model.save_pretrained(str(save_dir))
    return save_dir
