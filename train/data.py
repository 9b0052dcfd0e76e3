"""Prompts: load rows (hub / save_to_disk folder / local files), fill the template, tokenize once, shard by rank.

Prompts are tokenized once and truncated to `max_prompt_tokens`; they are padded per batch, never to a fixed
length. The sampler walks a seeded permutation that is identical on every rank; rank r takes positions
r, r + W, r + 2W, ... of each global batch, so ranks see different prompts and the data position is one number.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from detoxrl.train.config import DataConfig
from detoxrl.train.errors import InputError, InputKeyError, InputNotFoundError, first_line

log = logging.getLogger("detoxrl.data")

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(dataset: str, split: str, split_key: str = "data.split"):
    """A `datasets.Dataset` for (dataset, split). Local paths are tried before the hub. Bad input raises an
    InputError naming the key, the file and, for JSON lines, the line (`split_key` names the split's key)."""
    import datasets

    path = Path(dataset)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputKeyError(f"{split_key} {split!r} not in {path}; splits there: {sorted(ds)}")
                return ds[split]
            return ds
        for ext in LOCAL_FORMATS:
            candidate = path / f"{split}{ext}"
            if candidate.is_file():
                return _load_file(candidate, split)
        found = sorted(p.name for p in path.iterdir())
        raise InputNotFoundError(f"data.dataset {path}: not a save_to_disk folder and no {split}.jsonl/.csv/.parquet "
                                 f"inside (found: {found[:10]}); fix data.dataset or {split_key}")
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise InputNotFoundError(f"data.dataset: file not found: {path}; point data.dataset at an existing file "
                                     f"or folder")
        return _load_file(path, split)
    if dataset.startswith((".", "/", "~")):
        raise InputNotFoundError(f"data.dataset: path not found: {dataset}; point data.dataset at an existing file "
                                 f"or folder")
    return _load_hub(dataset, split, split_key)


def _load_file(path: Path, split: str):
    import datasets

    builders = logging.getLogger("datasets.packaged_modules")  # logs the parse error that we re-raise in one line
    level = builders.level
    builders.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
    except Exception as err:  # datasets reports a parse error without the file, and without the line for JSON
        raise unreadable_file(path, err) from err
    finally:
        builders.setLevel(level)


def unreadable_file(path: Path, err: BaseException) -> InputError:
    """Why `path` could not be read, in one line: for JSON the first line (and column) that does not parse."""
    fmt = LOCAL_FORMATS[path.suffix]
    where = f"data.dataset: {path}"
    cause = err.__cause__ or err.__context__ or err
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as bad:
        return InputError(f"{where}: not UTF-8 text (byte {bad.start}); save it as UTF-8")
    except OSError as bad:
        return InputError(f"{where}: cannot be read: {first_line(bad)}")
    if fmt == "json":
        if text.lstrip().startswith("["):  # one JSON array of objects
            try:
                json.loads(text)
            except json.JSONDecodeError as bad:
                return InputError(f"{where}:{bad.lineno}: not valid JSON ({bad.msg}, column {bad.colno}); fix it")
        else:  # JSON lines: one object per line
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as bad:
                    return InputError(f"{where}:{number}: not valid JSON ({bad.msg}, column {bad.colno}); fix or "
                                      f"remove that line")
                if not isinstance(row, dict):
                    return InputError(f"{where}:{number}: a JSON {type(row).__name__}, but every line must be one "
                                      f"object {{\"column\": value, ...}}")
    return InputError(f"{where}: not readable as {fmt}: {first_line(cause)}")


def _load_hub(dataset: str, split: str, split_key: str):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(dataset, split=split)
    except ConnectionError as err:  # not cached, and offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or no network
        raise InputNotFoundError(
            f"data.dataset {dataset!r} is not in the local datasets cache and the hub cannot be reached "
            f"({first_line(err)}). On a machine with network run `python -c \"import datasets; "
            f"datasets.load_dataset('{dataset}').save_to_disk('DIR')\"`, copy DIR here and set data.dataset=DIR") \
            from err
    except DatasetNotFoundError as err:
        raise InputNotFoundError(f"data.dataset {dataset!r} is neither a local file or folder nor a dataset on the "
                                 f"hub ({first_line(err)}); fix the name or the path") from err
    except ValueError as err:
        if str(err).startswith("Unknown split"):
            raise InputKeyError(f"{split_key} {split!r}: {first_line(err)}") from err
        raise


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class PromptSet:
    """Tokenized prompts and the rows they came from."""
    input_ids: list[list[int]]
    texts: list[str]                 # decoded prompt as the policy sees it (after truncation)
    references: list[Optional[str]]  # reference outputs (e.g. summaries) when data.reference_field is set
    dropped: int                     # rows filtered out (empty / too short)

    def __len__(self) -> int:
        return len(self.input_ids)


def build_prompts(rows, cfg: DataConfig, tokenizer, kind: str, seed: int) -> PromptSet:
    """Filter, fill the template, tokenize and truncate. Raises with the available columns on a wrong field."""
    columns = list(rows.column_names)
    needed = set(template_fields(cfg.template)) | {cfg.text_field}
    if cfg.reference_field:
        needed.add(cfg.reference_field)
    missing = sorted(needed - set(columns))
    if missing:
        raise InputKeyError(f"data: column(s) {missing} not in dataset {cfg.dataset!r} (split {cfg.split!r}); "
                            f"columns are: {columns}. Check data.text_field / data.template / data.reference_field.")
    texts, refs, dropped = [], [], 0
    for row in rows:
        value = row[cfg.text_field]
        if value is None or not str(value).strip() or len(str(value)) < cfg.min_text_chars:
            dropped += 1
            continue
        fields = {k: ("" if row[k] is None else str(row[k])) for k in template_fields(cfg.template)}
        texts.append(cfg.template.format(**fields) if fields else str(value))
        refs.append(row[cfg.reference_field] if cfg.reference_field else None)
        if cfg.max_samples is not None and len(texts) >= cfg.max_samples:
            break
    if dropped:
        log.warning("data: dropped %d row(s) whose %r is empty or shorter than %d characters", dropped,
                    cfg.text_field, cfg.min_text_chars)
    if not texts:
        raise InputError(f"data: no usable prompts in {cfg.dataset!r} split {cfg.split!r} after filtering "
                         f"(min_text_chars={cfg.min_text_chars}, {dropped} dropped)")
    # Causal prompts keep their END (next to the response); seq2seq keep the start and their EOS.
    tokenizer.truncation_side = "left" if kind == "causal" else "right"
    enc = tokenizer(texts, truncation=True, max_length=cfg.max_prompt_tokens, add_special_tokens=True)["input_ids"]
    if cfg.prompt_tokens_range is not None:
        lo, hi = cfg.prompt_tokens_range
        rng = np.random.default_rng(seed)
        enc = [ids[:int(rng.integers(lo, hi + 1))] for ids in enc]
    kept = [(ids, r) for ids, r in zip(enc, refs) if len(ids) > 0]
    if len(kept) < len(enc):
        log.warning("data: dropped %d prompt(s) that tokenized to nothing", len(enc) - len(kept))
        if not kept:
            raise InputError("data: every prompt tokenized to zero tokens")
    ids_list = [k[0] for k in kept]
    decoded = tokenizer.batch_decode(ids_list, skip_special_tokens=True)
    return PromptSet(ids_list, decoded, [k[1] for k in kept], dropped)


class PromptSampler:
    """Seeded, resumable, rank-sharded order over a PromptSet. Epoch e uses permutation(seed + e)."""

    def __init__(self, n: int, per_rank: int, rank: int, world: int, seed: int, shuffle: bool = True) -> None:
        if n < per_rank * world:
            raise InputError(f"data: {n} prompts is fewer than one global batch ({per_rank} x {world} ranks); use "
                             f"more data or a smaller ppo.batch_size")
        self.n, self.per_rank, self.rank, self.world, self.seed, self.shuffle = n, per_rank, rank, world, seed, shuffle
        self.epoch = 0
        self.index = 0  # position in the epoch's global order (same on all ranks)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng(self.seed + self.epoch).permutation(self.n)

    def next_indices(self) -> list[int]:
        global_batch = self.per_rank * self.world
        if self.index + global_batch > self.n:  # drop the ragged tail so every step has a full batch
            self.epoch += 1
            self.index = 0
        order = self._order()
        chunk = order[self.index:self.index + global_batch]
        self.index += global_batch
        return [int(i) for i in chunk[self.rank::self.world]]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"data position was saved for {state['n']} prompts / seed {state['seed']}, but this run "
                             f"has {self.n} / {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
