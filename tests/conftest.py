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
    from detoxrl.train.tiny_models import build_test_models

    return build_test_models(tmp_path_factory.mktemp("test_models"))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One demo-asset cache for the whole session (set through DETOXRL_CACHE unless the caller set it)."""
    path = Path(os.environ.get("DETOXRL_TEST_CACHE") or tmp_path_factory.mktemp("demo_cache"))
    os.environ["DETOXRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_assets(demo_cache) -> dict[str, Path]:
    from detoxrl.train.tiny_models import build_demo_assets

    return build_demo_assets()
