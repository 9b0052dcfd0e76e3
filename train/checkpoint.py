"""Checkpoints: step-numbered folders that are PEFT adapter folders plus what a resume needs.

    checkpoints/step-000010/
        adapter_config.json, adapter_model.safetensors   the trainable LoRA adapter (PeftModel.from_pretrained loads it)
        value_head.safetensors                           the value head
        critic/adapter_config.json, adapter_model.safetensors   the critic adapter (critic.mode: adapter)
        optimizer.pt, scheduler.pt                       torch state dicts (tensors only; loaded with weights_only)
        engine/                                          DeepSpeed runs, instead of optimizer.pt: the engine's own
                                                         checkpoint (every rank's ZeRO shard of the optimizer states
                                                         and fp32 weights) and engine.json (ZeRO stage, world size);
                                                         the adapter above is still the full, consolidated one
        rng/rank-00000.pt ...                            every rank's RNG states
        trainer_state.json                               step, samples seen, data position, KL controller, reward
                                                         statistics, config hash, resolved config, package versions
        COMPLETE                                         written last (after every file is fsynced): JSON with
                                                         the step and each file's size; a folder without it, or
                                                         whose files do not match it, is never resumed from

A checkpoint is written to `step-NNNNNN.tmp`, then swapped into place by train/atomic.py: a crash (even SIGKILL)
mid-write leaves only a `.tmp` folder, which is ignored and cleaned up; a folder of the same step being replaced is
exchanged in one step (or renamed to `.old` first where the filesystem cannot), one being pruned is renamed to `.old`
before it is deleted. So the newest complete checkpoint survives a kill at any moment. Assumes `output_dir` is on a
filesystem every rank sees (as on any cluster).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from detoxrl.train.atomic import fsync_path, fsync_tree, replace_directory, temporary_path
from detoxrl.train.config import Config, to_dict
from detoxrl.train.distributed import gathered_trainable, zero_stage
from detoxrl.train.models import CRITIC_ADAPTER
from detoxrl.train.tracking import write_json

log = logging.getLogger("detoxrl.checkpoint")

STEP_RE = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"

# Keys that may change between a checkpoint and its resume without changing the maths.
HARMLESS_PREFIXES = ("run.total_steps", "run.output_dir", "run.max_nonfinite_steps", "logging.", "checkpoint.",
                     "evaluation.", "reward.terms.*.device", "reward.terms.*.batch_size", "reference.device",
                     "generation.rollout_batch_size", "run.device", "generation.zero3_gather_weights",
                     "generation.engine", "generation.compile", "generation.static_pad_multiple",
                     "reward.placement", "reference.placement", "scorer.")


@dataclass
class TrainerState:
    """trainer_state.json: what a resume needs besides weights, optimizer, scheduler and RNG (build.Progress is its
    live form). Written by `save_checkpoint`, read only by `read_trainer_state`."""
    step: int                                  # steps done
    samples_seen: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)        # data.PromptSampler position
    kl_controller: dict[str, Any] = field(default_factory=dict)
    reward_moments: Optional[dict[str, Any]] = None             # reward.normalize's running statistics
    evaluation: dict[str, Any] = field(default_factory=dict)     # held-out "before" figures
    alarms: Optional[dict[str, Any]] = None                      # alarms.AlarmMonitor state
    world_size: Optional[int] = None           # processes that wrote it (their RNG states are in rng/)
    config: dict[str, Any] = field(default_factory=dict)         # the resolved config of the run that wrote it
    config_hash: Optional[str] = None
    packages: dict[str, Optional[str]] = field(default_factory=dict)


def read_trainer_state(folder: Path) -> TrainerState:
    """The trainer state of a checkpoint folder. Keys this version does not know are ignored (a newer writer)."""
    raw = json.loads((folder / "trainer_state.json").read_text())
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in raw.items() if k in known})


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_policy_files(policy, folder: Path) -> None:
    """The trainable adapter as a PEFT folder, the value head as safetensors, and with `critic.mode: adapter` the
    critic adapter as a PEFT folder in `critic/` (PEFT's layout for a second adapter)."""
    policy.lm.save_pretrained(str(folder), selected_adapters=["default"], safe_serialization=True)
    if policy.critic_mode == "adapter":
        policy.lm.save_pretrained(str(folder), selected_adapters=[CRITIC_ADAPTER], safe_serialization=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in policy.v_head.state_dict().items()},
              str(folder / "value_head.safetensors"))


def _load_adapter(policy, weights_file: Path, name: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(policy.lm, load_file(str(weights_file)), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {weights_file.parent}: adapter {name!r} has unexpected keys {unexpected[:5]}")


def load_policy_files(policy, folder: Path) -> None:
    _load_adapter(policy, folder / "adapter_model.safetensors", "default")
    if policy.critic_mode == "adapter":
        critic = folder / CRITIC_ADAPTER / "adapter_model.safetensors"
        if not critic.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no critic adapter ({critic}): it was written with "
                                    f"another critic.mode than this run's `adapter`")
        _load_adapter(policy, critic, CRITIC_ADAPTER)
    head = load_file(str(folder / "value_head.safetensors"))
    policy.v_head.load_state_dict({k: v.to(policy.v_head.weight.dtype) for k, v in head.items()})


def rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # legacy global numpy RNG (third-party code uses it)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


ENGINE = "engine"
ENGINE_TAG = "state"


def save_engine_state(accelerator, engine, folder: Path) -> None:
    """Collective (DeepSpeed): every rank writes its ZeRO shard of the optimizer states and fp32 master weights.
    Frozen base weights are left out (they are the pretrained model's)."""
    engine.save_checkpoint(str(folder / ENGINE), tag=ENGINE_TAG, exclude_frozen_parameters=True, save_latest=False)
    if accelerator.is_main_process:
        write_json(folder / ENGINE / "engine.json", {"zero_stage": zero_stage(accelerator),
                                                     "world_size": accelerator.num_processes})


def load_engine_state(accelerator, engine, folder: Path) -> None:
    """Collective (DeepSpeed): restore trainable weights, fp32 master weights and optimizer states of this rank.
    ZeRO shards fit only the same stage and number of processes: anything else is refused with the reason."""
    now = {"zero_stage": zero_stage(accelerator), "world_size": accelerator.num_processes}
    saved = json.loads((folder / ENGINE / "engine.json").read_text()) if (folder / ENGINE).is_dir() else None
    if saved != now:
        def strategy(d: Optional[dict]) -> str:
            if not d or d["zero_stage"] is None:
                return "without DeepSpeed"
            return f"under DeepSpeed ZeRO-{d['zero_stage']} on {d['world_size']} process(es)"

        raise ValueError(f"checkpoint {folder} was written {strategy(saved)}, this run is {strategy(now)}: "
                         f"optimizer states are sharded differently, so it can only be resumed with the strategy "
                         f"and number of processes that wrote it (its adapter folder loads anywhere)")
    engine.load_checkpoint(str(folder / ENGINE), tag=ENGINE_TAG, load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=False)


def save_checkpoint(accelerator, policy, optimizer, scheduler, trainer_state: TrainerState, root: Path,
                    step: int, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the final folder."""
    final = step_dir(root, step)
    tmp = temporary_path(final)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / "rng" / f"rank-{accelerator.process_index:05d}.pt")
    deepspeed = zero_stage(accelerator) is not None
    with gathered_trainable(accelerator, policy):  # collective under ZeRO-3; rank 0 writes the full adapter
        if accelerator.is_main_process:
            save_policy_files(accelerator.unwrap_model(policy), tmp)
    if deepspeed:
        save_engine_state(accelerator, policy, tmp)
    if accelerator.is_main_process:
        if os.environ.get("DETOXRL_TEST_CHECKPOINT_DELAY"):  # test hook: widen the window a kill -9 can land in
            time.sleep(float(os.environ["DETOXRL_TEST_CHECKPOINT_DELAY"]))
        if not deepspeed:  # (a DeepSpeed optimizer's state_dict would be rank 0's shard only)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "trainer_state.json", asdict(trainer_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_complete_marker(tmp, step)
        replace_directory(tmp, final)  # a folder of the same step is replaced without a moment with neither
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def write_complete_marker(folder: Path, step: int) -> None:
    """Flush every file to disk, then write COMPLETE listing them with their sizes (a node crash or a truncated
    copy is then detected, not only a killed process)."""
    fsync_tree(folder)
    (folder / COMPLETE).write_text(json.dumps({"step": step, "files": _file_sizes(folder)}, indent=1) + "\n")
    fsync_path(folder / COMPLETE)


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
        old = p.with_name(p.name + ".old")  # renamed first: a kill mid-delete leaves no half folder named step-N
        p.rename(old)
        shutil.rmtree(old, ignore_errors=True)


def is_valid(folder: Path) -> Optional[str]:
    """None if the checkpoint looks loadable, else the reason it is not."""
    optimizer_file = f"{ENGINE}/engine.json" if (folder / ENGINE).is_dir() else "optimizer.pt"
    for name in (COMPLETE, "trainer_state.json", "adapter_model.safetensors", "adapter_config.json",
                 "value_head.safetensors", optimizer_file, "scheduler.pt"):
        if not (folder / name).is_file():
            return f"missing {name}" + (" (interrupted while being written?)" if name == COMPLETE else "")
    try:
        marker = (folder / COMPLETE).read_text()
        expected = json.loads(marker)["files"] if marker.lstrip().startswith("{") else {}  # older: "step N"
        actual = _file_sizes(folder)
        for name, size in expected.items():
            if actual.get(name) != size:
                return f"{name} is {'missing' if name not in actual else f'{actual[name]} bytes, not {size}'}"
        read_trainer_state(folder)
        load_file(str(folder / "value_head.safetensors"))
        load_file(str(folder / "adapter_model.safetensors"))
        if (folder / CRITIC_ADAPTER).is_dir():
            load_file(str(folder / CRITIC_ADAPTER / "adapter_model.safetensors"))
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
        for p in sorted(root.glob("step-*.old")):  # left by a kill while a folder was being replaced or pruned
            shutil.rmtree(p, ignore_errors=True)
        for p in sorted(root.glob("step-*.tmp")):
            final = p.with_name(p.name[:-len(".tmp")])
            if not final.exists() and is_valid(p) is None:  # killed between COMPLETE and the rename
                p.rename(final)
                continue
            log.warning("removing incomplete checkpoint %s (interrupted while being written)", p)
            shutil.rmtree(p, ignore_errors=True)
    candidates = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                        if (m := STEP_RE.match(p.name)) and p.is_dir())
    for _, path in reversed(candidates):
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
    """Keys whose change alters the maths (harmless ones such as total_steps or logging are ignored). A key the
    checkpoint's (older) detoxrl did not have yet counts only if it is set to something else than its default; a
    key this version no longer has does not count."""
    a, b, defaults = _flatten(saved), _flatten(current), _flatten(to_dict(Config()))

    def changed(k: str) -> bool:
        if k not in b:
            return False
        if k not in a:
            return b[k] != defaults.get(re.sub(r"\.\d+\.", ".0.", k), object())
        return a[k] != b[k]

    return sorted(k for k in set(a) | set(b) if changed(k) and not _harmless(k))


def check_resumable(state: TrainerState, folder: Path, cfg: Config) -> None:
    """Refuse a checkpoint whose config differs in keys that alter the run (unless allowed); warn when a changed
    run.total_steps stretches the schedule."""
    diff = config_differences(state.config, to_dict(cfg))
    if diff and not cfg.checkpoint.allow_config_change:
        raise ValueError(f"refusing to resume from {folder}: the config changed in keys that alter the "
                         f"run: {', '.join(diff)}. Set checkpoint.allow_config_change=true to force it, or "
                         f"checkpoint.resume=never with a new run.output_dir.")
    saved_steps = state.config["run"]["total_steps"]
    if saved_steps != cfg.run.total_steps and cfg.optim.scheduler != "constant":
        log.warning("run.total_steps changed from %d to %d: the %s learning-rate schedule now spans the new "
                    "length, so the run differs from one started with %d steps", saved_steps, cfg.run.total_steps,
                    cfg.optim.scheduler, cfg.run.total_steps)


def load_checkpoint(path: Path, accelerator, policy, optimizer, scheduler) -> tuple[TrainerState, bool]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the trainer state and whether the RNG was
    restored (not when the number of processes changed)."""
    state = read_trainer_state(path)
    if zero_stage(accelerator) is not None or (path / ENGINE).is_dir():
        load_engine_state(accelerator, policy, path)  # weights live in the engine's fp32 partitions too
    else:
        load_policy_files(accelerator.unwrap_model(policy), path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / "rng" / f"rank-{accelerator.process_index:05d}.pt"
    rng_restored = state.world_size == accelerator.num_processes and rng_file.is_file()
    if rng_restored:
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("resuming on %d process(es) from a checkpoint written by %s: the run continues correctly, but "
                    "it is no longer bit-exact with an uninterrupted run (random streams differ)",
                    accelerator.num_processes, state.world_size)
    return state, rng_restored
