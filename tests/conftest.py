"""Shared fixtures: tiny local models (built once per session), an isolated demo cache, CPU-only settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def test_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of the recipes' families (T5, GPT-2, RoBERTa, DistilBERT) and local datasets."""
    from detoxrl.train.stand_in_models import build_test_models

    return build_test_models(tmp_path_factory.mktemp("test_models"))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One demo-asset cache for the whole session (set through DETOXRL_CACHE unless the caller set it)."""
    path = Path(os.environ.get("DETOXRL_TEST_CACHE") or tmp_path_factory.mktemp("demo_cache"))
    os.environ["DETOXRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_assets(demo_cache) -> dict[str, Path]:
    from detoxrl.train.demo_assets import build_demo_assets

    return build_demo_assets()


CAUSAL_TEMPLATE = "{dialogue}\nSummary:"


@pytest.fixture(scope="session")
def causal_demo(demo_assets, tmp_path_factory) -> dict[str, Path]:
    """The demo's data and toxicity classifier with a tiny GPT-2 fine-tuned to continue dialogues with summaries."""
    from detoxrl.train.local_tokenizers import train_tokenizer
    from detoxrl.train.shipped_data import DEMO_DATA_DIR, load_jsonl
    from detoxrl.train.tiny_builders import build_gpt2
    from detoxrl.train.tiny_finetune import sft_causal

    rows = [r for r in load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl") if r["split"] == "train"]
    texts = [CAUSAL_TEMPLATE.format(dialogue=r["dialogue"]) + " " + r["summary"] for r in rows]
    root = tmp_path_factory.mktemp("causal_demo")
    tok = train_tokenizer(texts, "gpt2", vocab_size=800)
    torch.set_num_threads(1)
    build_gpt2(root / "policy", tok, n_positions=256, seed=0, dropout=0.0)
    sft_causal(root / "policy", texts, steps=300, lr=3e-3, batch_size=16, seed=0, max_length=128)
    return {"policy": root / "policy", "reward": demo_assets["reward"], "data": demo_assets["data"]}


@pytest.fixture(scope="session")
def shipped_demo_run(demo_assets, tmp_path_factory):
    """The demo recipe exactly as shipped, trained once per session: (RunResult, run_dir)."""
    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train

    out = tmp_path_factory.mktemp("shipped_demo")
    cfg = load_config(REPO / "configs/ppo/demo.yaml", [f"run.output_dir={out}", "logging.progress_bar=false"])
    return train(cfg), out


# The demo recipe on the GAE path with one response per prompt, as it was before it switched to RLOO (k = 4): the
# tests of distributed and resume mechanics that use the demo's models build on it (and name each estimator they test).
DEMO_GAE = ["ppo.estimator=gae", "ppo.k=1"]

# The over-optimised demo (docs/alarms.md): a learning rate 3x the demo's and a fixed, weak KL pull.
OVER_OPTIMISED = ["optim.lr=3e-3", "ppo.kl.init_coef=0.05", "ppo.kl.adaptive=false"]


@pytest.fixture(scope="session")
def over_optimised_run(demo_assets, tmp_path_factory) -> tuple[int, Path]:
    """The over-optimised demo with alarms.action=stop, through the command line: (exit status, run dir). It has a
    held-out "before" but no "after": the alarm ends it first."""
    out = tmp_path_factory.mktemp("over_optimised")
    from detoxrl.train.cli import main as train_main

    code = train_main(["--config", str(REPO / "configs/ppo/demo.yaml"), *OVER_OPTIMISED, "alarms.action=stop",
                       "run.total_steps=25", "logging.sample_every=1", "logging.num_samples=16",
                       "logging.progress_bar=false", f"run.output_dir={out}"])
    return code, out
