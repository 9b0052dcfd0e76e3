"""Where each process's models sit: the training ranks' GPUs and the dedicated reward / reference devices.

One rule, shared by the trainer (which places the models) and `detoxrl-launch` (which plans and checks a launch):

- the training rank with local index i trains on `cuda:i` (accelerate's placement), or on the CPU without GPUs;
- a reward model or the reference copy set to `cuda:N` sits on that GPU, `cpu` on the CPU;
- `auto` takes the GPUs that no training rank of the machine uses (`cuda:R` .. `cuda:G-1` with R local ranks and G
  visible GPUs), in order: the first `auto` device gets the first spare GPU, the next one the next, wrapping
  around; with no spare GPU it is the rank's own device.

Every rank of a machine places its own copy of a reward model on the same dedicated GPU, so that GPU holds one
copy per local rank. No torch import here: the launcher stays fast.
"""

from __future__ import annotations

import re
from typing import Optional

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str, key: str) -> None:
    """Raise ValueError naming `key` unless `name` is `auto`, `cpu`, `cuda` or `cuda:N`."""
    if not DEVICE_RE.match(name):
        raise ValueError(f"{key}: {name!r} is not a device; use auto, cpu or cuda:N")


def gpu_index(name: str) -> Optional[int]:
    """N for `cuda:N`, None for anything else (`cuda` alone means the current device, so no fixed index)."""
    m = re.match(r"^cuda:(\d+)$", name)
    return int(m.group(1)) if m else None


def spare_gpus(n_gpus: int, local_ranks: int) -> list[int]:
    """GPU indices that no training rank of this machine uses."""
    return list(range(min(local_ranks, n_gpus), n_gpus))


def place_auxiliary(requested: list[str], n_gpus: int, local_ranks: int, own_device: str) -> list[str]:
    """Resolve `auto` in `requested` (one entry per reward term / reference copy, in that order) to a device name.

    `own_device` is the rank's training device (`cuda:i` or `cpu`). Named devices are returned unchanged."""
    spare = spare_gpus(n_gpus, local_ranks)
    out, k = [], 0
    for name in requested:
        if name == "auto":
            out.append(f"cuda:{spare[k % len(spare)]}" if spare else own_device)
            k += 1
        else:
            out.append(name)
    return out
