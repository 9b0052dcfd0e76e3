"""Resolve `demo` placeholders in a config to the offline demo's locally built, cached assets."""

from __future__ import annotations

from functools import lru_cache

DEMO = "demo"


@lru_cache(maxsize=1)
def _demo_assets() -> dict:
    from detoxrl.train.tiny_models import build_demo_assets

    return {k: str(v) for k, v in build_demo_assets().items()}


def resolve(name: str, role: str) -> str:
    """`demo` -> the built asset for `role` ("policy", "reward" or "data"); anything else is returned unchanged."""
    if name != DEMO:
        return name
    return _demo_assets()[role]
