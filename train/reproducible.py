"""Deterministic, quiet builds: the RNG guard, seeding and thread count every tiny-model builder runs under.

Builders seed torch and ``random`` themselves and leave the caller's generator states as they were; they run torch
on one thread (:data:`BUILD_THREADS`), which makes them bitwise reproducible and immune to contention from other
processes for the cores.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
from typing import Iterator

import torch

BUILD_THREADS = 1  # deterministic, and immune to contention from other processes


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored on exit)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
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


def rng_guarded(fn):
    """Decorator: run ``fn`` under :func:`rng_guard` (it seeds torch/random itself)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with rng_guard():
            return fn(*args, **kwargs)

    return wrapper


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_guard() -> Iterator[None]:
    """Leave the caller's torch (CPU) and ``random`` generator states as they were."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)

