"""What a run writes for people to watch: TensorBoard scalars and text, metrics.jsonl, run_info.json, console.

Only the main process writes; every other rank logs warnings only.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger("detoxrl")

PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "tokenizers", "detoxrl")


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("detoxrl")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) on every rank
    if not is_main:
        import datasets
        import transformers
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


def package_versions() -> dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# Response statistics that reveal reward hacking (logged per step next to reward and KL; also used by eval).
def distinct_n(texts: Sequence[str], n: int) -> Optional[float]:
    """Unique word n-grams / all word n-grams over all responses (corpus level). Low = repetitive output."""
    total, unique = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def duplicate_share(texts: Sequence[str]) -> float:
    """Share of responses that repeat an earlier response exactly (mode collapse shows up here first)."""
    return 1.0 - len(set(texts)) / len(texts) if texts else 0.0


def sample_rows(prompts: list[str], references: Optional[list[Optional[str]]], responses: list[str],
                scores: Sequence[float], term_scores: Sequence[Sequence[float]], reward: Any,
                judged: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Rows for samples.jsonl and the TensorBoard table: prompt (its last 200 characters), reference, response,
    total reward, each reward term and each judge's P(toxic)."""
    rows = []
    for k, (p, r) in enumerate(zip(prompts, responses)):
        row: dict[str, Any] = {"prompt": p[-200:], "response": r, "reward": float(scores[k])}
        if references is not None:
            row["reference"] = references[k]
        row["terms"] = {f"{t.name}/{t.cfg.label}": float(s[k]) for t, s in zip(reward.terms, term_scores)}
        if judged:
            row["judges"] = {name: v[k] for name, v in judged.items()}
        rows.append(row)
    return rows


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step, so a resumed run writes every later step once (also at step 0: a run
    killed before its first checkpoint had logged steps). Blank lines and a line cut short by a kill -9 go too."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= last_step:
                kept.append(ln)
        except ValueError:
            pass
    path.write_text("".join(k + "\n" for k in kept))


class RunLogger:
    """TensorBoard + metrics.jsonl + progress bar, on the main process only.

    `start_step` lets a resumed run continue the same TensorBoard curves: events after it are purged (also those a
    killed run logged after its last checkpoint), and metrics.jsonl and samples.jsonl keep only the lines up to it.
    """

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True) -> None:
        self.is_main = is_main
        self.writer = None
        self.bar = None
        self.metrics_path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        if not is_main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                        purge_step=start_step + 1)
        for path in (self.metrics_path, self.samples_path):
            _truncate_jsonl(path, start_step)
        if progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="PPO", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        if self.writer is not None:
            for k, v in clean.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """`rows` (prompt, response, reward, ...) to samples.jsonl, one line each with the step, and as a text table
        to TensorBoard (nested values, such as per-term scores, only in samples.jsonl)."""
        if not self.is_main or not rows:
            return
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.writer is not None:
            flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
            self.writer.add_text("samples", _markdown_table(flat), step)

    def progress(self, step: int, reward: float, kl: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(reward=f"{reward:.3f}", kl=f"{kl:.3f}")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class PhaseTimer:
    """Wall seconds per phase; synchronises CUDA once per phase boundary so timings are honest."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
