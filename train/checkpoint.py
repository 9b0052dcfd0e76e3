"""Checkpoints: step-numbered folders that are PEFT adapter folders plus what a resume needs.

    checkpoints/step-000010/
        adapter_config.json, adapter_model.safetensors   the trainable LoRA adapter (PeftModel.from_pretrained loads it)
        value_head.safetensors                           the value head
        optimizer.pt, scheduler.pt                       torch state dicts (tensors only; loaded with weights_only)
        rng/rank-00000.pt ...                            every rank's RNG states
        trainer_state.json                               step, samples seen, data position, KL controller, reward
                                                         statistics, config hash, resolved config, package versions
        COMPLETE                                         written last; a folder without it is never resumed from

A checkpoint is written to `step-NNNNNN.tmp`, then renamed: a crash mid-write leaves only a `.tmp` folder, which
is ignored and cleaned up. Assumes `output_dir` is on a filesystem every rank sees (as on any cluster).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from detoxrl.train.tracking import write_json

log = logging.getLogger("detoxrl.checkpoint")

STEP_RE = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"

# Keys that may change between a checkpoint and its resume without changing the maths.
HARMLESS_PREFIXES = ("run.total_steps", "run.output_dir", "run.max_nonfinite_steps", "logging.", "checkpoint.",
                     "evaluation.", "reward.terms.*.device", "reward.terms.*.batch_size", "reference.device",
                     "generation.rollout_batch_size", "run.device")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_policy_files(policy, folder: Path) -> None:
    """The trainable adapter as a PEFT folder, and the value head as safetensors."""
    policy.lm.save_pretrained(str(folder), selected_adapters=["default"], safe_serialization=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in policy.v_head.state_dict().items()},
              str(folder / "value_head.safetensors"))


def load_policy_files(policy, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file as load_st

    weights = load_st(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(policy.lm, weights, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {folder}: adapter has unexpected keys {unexpected[:5]}")
    head = load_file(str(folder / "value_head.safetensors"))
    policy.v_head.load_state_dict({k: v.to(policy.v_head.weight.dtype) for k, v in head.items()})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, policy, optimizer, scheduler, trainer_state: dict[str, Any], root: Path,
                    step: int, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the final folder."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / "rng" / f"rank-{accelerator.process_index:05d}.pt")
    if accelerator.is_main_process:
        save_policy_files(accelerator.unwrap_model(policy), tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "trainer_state.json", trainer_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(f"step {step}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(root: Path, keep_last: int) -> None:
    for _, p in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def is_valid(folder: Path) -> Optional[str]:
    """None if the checkpoint looks loadable, else the reason it is not."""
    for name in (COMPLETE, "trainer_state.json", "adapter_model.safetensors", "adapter_config.json",
                 "value_head.safetensors", "optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"missing {name}"
    try:
        json.loads((folder / "trainer_state.json").read_text())
        load_file(str(folder / "value_head.safetensors"))
        load_file(str(folder / "adapter_model.safetensors"))
    except Exception as err:  # corrupt JSON or tensor file
        return f"unreadable: {err}"
    return None


def find_resume_checkpoint(root: Path, resume: str, is_main: bool) -> Optional[Path]:
    """`never` -> None; a path -> that checkpoint (checked); `auto` -> newest valid one, skipping broken ones."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        reason = is_valid(path) if path.is_dir() else "not a folder"
        if reason:
            raise FileNotFoundError(f"checkpoint.resume={resume}: not a usable checkpoint ({reason})")
        return path
    if is_main and root.is_dir():
        for p in root.glob("step-*.tmp"):
            log.warning("removing incomplete checkpoint %s (interrupted while being written)", p)
            shutil.rmtree(p, ignore_errors=True)
    for _, path in reversed(list_checkpoints(root)):
        reason = is_valid(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, reason)
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[key + ".len"] = len(v)
            for i, x in enumerate(v):
                out.update(_flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _harmless(key: str) -> bool:
    generic = re.sub(r"\.\d+\.", ".*.", key)
    return any(generic == p or generic.startswith(p) for p in HARMLESS_PREFIXES if p.endswith(".")) or \
        any(generic == p for p in HARMLESS_PREFIXES)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose change alters the maths (harmless ones such as total_steps or logging are ignored)."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _harmless(k))


def load_checkpoint(path: Path, accelerator, policy, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the trainer state."""
    state = json.loads((path / "trainer_state.json").read_text())
    load_policy_files(accelerator.unwrap_model(policy), path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / "rng" / f"rank-{accelerator.process_index:05d}.pt"
    if state.get("world_size") == accelerator.num_processes and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("resuming on %d process(es) from a checkpoint written by %s: the run continues correctly, but "
                    "it is no longer bit-exact with an uninterrupted run (random streams differ)",
                    accelerator.num_processes, state.get("world_size"))
    return state
