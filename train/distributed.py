"""accelerate / DeepSpeed plumbing for the loop: one place for the strategy-specific details.

- `make_accelerator`: the Accelerator, refusing the silent single-process traps of CPU launches
  (docs/ARCHITECTURE.md, "Distributed traps").
- `models_built_whole`: ZeRO-3 must not build the models inside `deepspeed.zero.Init` (prepare shards the policy).
- `fill_deepspeed_config`: the DeepSpeed JSON's "auto" entries from the run config (there is no dataloader for
  accelerate to read a batch size from).
- `accumulating`: one micro-batch of gradient accumulation whose phase the loop owns (DDP `no_sync`, DeepSpeed
  accumulation boundary).
- `generation_weights`: ZeRO-3 gathers the sharded policy once per rollout (or generates sharded with synced ranks).
- `gathered_trainable`: ZeRO-3 gathers the trainable weights in full, to save or compare them.
- `describe`: the strategy, precision and offload facts for run_info.json.
- `reduce_mean`, `sum_reducer`, `any_rank`: the loop's small all-reduces (metrics, global statistics, stop flags).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

import torch

from detoxrl.train.config import ConfigError

log = logging.getLogger("detoxrl.distributed")


class LaunchError(ConfigError):
    """A launch that would train wrongly or not at all (precision, device, process count); says what to type."""

    label = "launch error"  # how the CLIs introduce it (train/errors.py report)


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config (or --use_deepspeed) sets this for every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(run_device: str, gradient_accumulation_steps: int):
    """The Accelerator for this process. Refuses launches that accelerate would silently run as one process."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_ds = deepspeed_requested()
    if use_ds and run_device == "cpu" and torch.cuda.is_available():
        raise LaunchError("run.device=cpu under DeepSpeed: DeepSpeed trains on the GPUs when there are any; drop "
                          "run.device=cpu or launch without DeepSpeed")
    # gloo on CPU: without it accelerate reports a single process for multi-CPU runs (docs/ARCHITECTURE.md). Only when
    # launched with several processes: an explicit backend in a plain single process makes accelerate fail.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 and not torch.cuda.is_available() else []
    if use_ds:  # raised by DeepSpeed's own collectives on every step; nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)"
                                r"` is deprecated", category=FutureWarning)
    # DeepSpeed on a CPU-only machine must not be asked for `cpu`: accelerate would quietly drop DeepSpeed.
    accelerator = Accelerator(cpu=run_device == "cpu" and not use_ds, kwargs_handlers=handlers,
                              gradient_accumulation_steps=gradient_accumulation_steps)
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise LaunchError(f"accelerate was launched with gradient accumulation "
                          f"{accelerator.gradient_accumulation_steps} (ACCELERATE_GRADIENT_ACCUMULATION_STEPS); detoxrl "
                          f"takes it from ppo.gradient_accumulation_steps={gradient_accumulation_steps}: set that instead")
    if use_ds and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(
            f"DeepSpeed was requested but accelerate set up {accelerator.distributed_type.value}: ACCELERATE_USE_CPU "
            f"(or --cpu / use_cpu: true) turns DeepSpeed off. On a CPU-only machine launch DeepSpeed without it.")
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        # e.g. --multi_gpu without GPUs: 2 processes that accelerate treats as unrelated (no gradient all-reduce)
        raise LaunchError(
            f"launched with WORLD_SIZE={world}, but accelerate set up {accelerator.num_processes} process(es) of "
            f"type {accelerator.distributed_type.value}, which would not synchronise gradients. On a CPU-only "
            f"machine DDP needs ACCELERATE_USE_CPU=1 with --multi_gpu; `--cpu --num_processes N` runs one process "
            f"(the header of configs/accelerate/ddp.yaml shows the CPU command). detoxrl-launch builds working "
            f"command lines.")
    check_precision(accelerator.device, accelerator.mixed_precision)
    return accelerator


def check_precision(device: torch.device, mixed_precision: str) -> None:
    """The CPU trains in float32 only; a GPU without mixed precision works but is worth a warning, since the shipped
    accelerate files leave precision to the command line."""
    if device.type == "cpu" and mixed_precision != "no":
        raise LaunchError(f"mixed precision {mixed_precision} was requested, but this run trains on the CPU, which "
                          f"detoxrl does in float32: drop --mixed_precision (or pass --mixed_precision no)")
    if device.type == "cuda" and mixed_precision == "no":
        log.warning("no mixed precision on %s: the shipped accelerate configs take precision from the command line; "
                    "add --mixed_precision bf16 (fp16 on GPUs without bf16) unless float32 is what you want", device)


def zero_stage(accelerator) -> Optional[int]:
    """The ZeRO stage under DeepSpeed, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def fill_deepspeed_config(accelerator, mini_batch_size: int, gradient_accumulation_steps: int,
                          max_grad_norm: Optional[float], hidden_size: int) -> dict[str, Any]:
    """Fill the DeepSpeed config's "auto" entries from the run config, before `accelerator.prepare`.

    Batch sizes and accumulation come from ppo.mini_batch_size / ppo.gradient_accumulation_steps, clipping from
    ppo.max_grad_norm (DeepSpeed clips inside its step), bucket sizes from the model width (accelerate's rule).
    An explicit value that contradicts the run config is an error naming both. Returns the final config."""
    plugin = accelerator.state.deepspeed_plugin
    micro = mini_batch_size // gradient_accumulation_steps
    from_run = {
        "train_micro_batch_size_per_gpu": (micro, "ppo.mini_batch_size / ppo.gradient_accumulation_steps"),
        "gradient_accumulation_steps": (gradient_accumulation_steps, "ppo.gradient_accumulation_steps"),
        "train_batch_size": (micro * gradient_accumulation_steps * accelerator.num_processes,
                             "ppo.mini_batch_size x number of processes"),
        "gradient_clipping": (float(max_grad_norm or 0.0), "ppo.max_grad_norm (null = 0.0, no clipping)"),
    }
    from_width = {
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    config = plugin.deepspeed_config
    if "scheduler" in config:  # DeepSpeed would step it inside its engine, on top of ours
        raise LaunchError("the DeepSpeed config has a \"scheduler\" section: detoxrl steps its own learning-rate "
                          "schedule (optim.scheduler, optim.warmup_steps) in every strategy; remove the section")
    conflicts = []
    for key, (value, source) in from_run.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            conflicts.append(f"{key}={current} in the DeepSpeed config, but the run needs {value} ({source})")
    if conflicts:
        raise LaunchError("DeepSpeed config contradicts the run config: " + "; ".join(conflicts) +
                          ". Set these entries to \"auto\" so they follow the run config.")
    for key, value in from_width.items():
        if plugin.is_auto(key):
            node, leaf = plugin.hf_ds_config.find_config_node(key)
            node[leaf] = value
    return config


@contextmanager
def models_built_whole(accelerator) -> Iterator[None]:
    """Under ZeRO-3, load models whole rather than inside `deepspeed.zero.Init`: `prepare` shards the policy, while
    the reference copy and the reward models are never sharded (nothing would gather them), and T5 built inside
    zero.Init came out degenerate (docs/ARCHITECTURE.md). transformers decides from accelerate's global DeepSpeed
    config, even with zero3_init_flag false, so that is hidden for the duration."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@contextmanager
def accumulating(accelerator, model, boundary: bool) -> Iterator[None]:
    """One micro-batch of gradient accumulation, the forward and the backward inside, its phase owned by the loop.

    A skipped mini-batch must not shift the phase, as the step counter of accelerate's `accumulate()` would; so the
    loop says which micro-batch closes the mini-batch. DDP: no all-reduce before that one (`no_sync` must cover the
    forward too). DeepSpeed: `accelerator.backward` passes the boundary to the engine, which reduces (ZeRO-2/3
    partition gradients every micro-batch) and, at the boundary, clips, steps and zeroes the gradients itself.
    """
    from accelerate.utils import DistributedType

    accelerator.sync_gradients = boundary
    try:
        skip_sync = not boundary and accelerator.distributed_type != DistributedType.DEEPSPEED
        with accelerator.no_sync(model) if skip_sync else nullcontext():
            yield
    finally:
        accelerator.sync_gradients = True


@contextmanager
def generation_weights(accelerator, engine, gather: bool) -> Iterator[bool]:
    """Around generation; yields `synced_gpus` for `generate()`.

    ZeRO-3 with `gather`: the sharded policy is gathered in full on every rank once for the whole rollout and the
    engine's per-layer fetch hooks are lifted meanwhile (DeepSpeed's `unwrap_model_for_generation`), so generating
    involves no communication and ranks may stop at different lengths. Without `gather`: weights stay sharded and
    are fetched layer by layer for every token, so every rank must keep stepping until all are done
    (`synced_gpus=True`; without it ranks deadlock). Other strategies: nothing to do."""
    if zero_stage(accelerator) != 3:
        yield False
    elif gather:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield False
    else:
        yield True


@contextmanager
def gathered_trainable(accelerator, model) -> Iterator[None]:
    """Collective under ZeRO-3 (every rank must enter): the trainable weights (LoRA, value head), sharded over the
    ranks, are gathered in full on every rank for the duration; read-only. A no-op under other strategies."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def describe(accelerator) -> dict[str, Any]:
    """Strategy facts for run_info.json: distributed type, ZeRO stage, offload, mixed precision, process layout."""
    stage = zero_stage(accelerator)
    info: dict[str, Any] = {
        "distributed_type": accelerator.distributed_type.value, "zero_stage": stage,
        "mixed_precision": accelerator.mixed_precision, "world_size": accelerator.num_processes,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
        "num_machines": max(1, accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                accelerator.num_processes))),
        "backend": getattr(accelerator.state, "backend", None)}
    if stage is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        zero = ds.get("zero_optimization", {})
        info["deepspeed"] = {
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
            "offload_param": zero.get("offload_param", {}).get("device", "none"),
            "bf16": bool(ds.get("bf16", {}).get("enabled")), "fp16": bool(ds.get("fp16", {}).get("enabled")),
            **{k: ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                      "train_batch_size", "gradient_clipping")}}
    return info


def reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average per-rank scalars over ranks (ranks hold equal batch sizes, so this is the global mean)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def sum_reducer(accelerator):
    """A `reduce_fn` for ppo_math's global statistics, or None on one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").to(t.device)


def any_rank(accelerator, flag: bool) -> bool:
    """True if `flag` is true on any rank (keeps ranks in lock-step when skipping an update)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)

