"""Resolve `demo` placeholders in a config to the offline demo's locally built, cached assets."""

from __future__ import annotations

from functools import lru_cache

DEMO = "demo"


@lru_cache(maxsize=1)
def _demo_assets() -> dict:
    from detoxrl.train.demo_assets import build_demo_assets

    return {k: str(v) for k, v in build_demo_assets().items()}


@lru_cache(maxsize=1)
def _demo_judge() -> str:
    from detoxrl.train.demo_assets import build_demo_judge

    return str(build_demo_judge())


def resolve(name: str, role: str) -> str:
    """`demo` -> the built asset for `role` ("policy", "reward", "data" or "judge"); anything else is returned
    unchanged."""
    if name != DEMO:
        return name
    if role == "judge":  # its own cache entry: caches of the other demo assets stay valid
        return _demo_judge()
    return _demo_assets()[role]
