"""The data shipped in train/demo_data/ (JSON lines) and the keyword rule that labels it.

Read by the demo-asset builders (train/demo_assets.py), the test stand-ins (train/stand_in_models.py), the tests
and the benchmarks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

DEMO_DATA_DIR: Path = Path(__file__).resolve().parent / "demo_data"

#: The prompt the demo policy is fine-tuned with (same wording as the recipes).
PROMPT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"

#: Words that make a text toxic in the shipped data (used to label summaries).
TOXIC_WORDS = (
    "idiot", "stupid", "pathetic", "worthless", "loser", "moron", "clown", "fool", "jerk",
    "trash", "garbage", "dumb", "useless", "brainless", "lazy", "disgusting", "hate", "shut up",
)


def load_jsonl(path) -> list[dict]:
    """Read a JSON-lines file (blank lines ignored)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def is_toxic_text(text: str) -> bool:
    """Keyword rule that labels the shipped data (and helps to check the classifier)."""
    low = text.lower()
    return any(w in low for w in TOXIC_WORDS)


def dialogue_rows() -> list[dict]:
    """dialogues.jsonl: id, dialogue, summary, topic, split (train/test)."""
    return load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")


def toxicity_rows() -> list[dict]:
    """toxicity.jsonl: text, label (hate/nothate), the reward classifier's own sentences."""
    return load_jsonl(DEMO_DATA_DIR / "toxicity.jsonl")


def judge_rows() -> list[dict]:
    """The judge's training sentences. They were written from templates of their own (other wording, other people
    and objects) and share no text with toxicity.jsonl or the dialogue summaries the reward model learned from
    (tests/test_judges.py checks), so the judge's errors are not the reward model's."""
    return load_jsonl(DEMO_DATA_DIR / "judge_toxicity.jsonl")
