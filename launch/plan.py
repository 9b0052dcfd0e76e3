"""Launch plans: how many training ranks, which GPU each trains on, where reward models and the reference sit, and
the exact `accelerate launch` command line. Pure functions (no torch, no GPU needed): unit-tested with made-up
machines, and refusing impossible plans with a message that says what to change.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from detoxrl.train.devices import check_device_name, gpu_index, place_auxiliary

# The shipped accelerate / DeepSpeed files travel inside the package (launch/configs links to the repository's
# configs/ in a checkout; a wheel holds copies), so an installed detoxrl-launch finds them without a clone.
CONFIGS = Path(__file__).resolve().parent / "configs"
ACCELERATE_CONFIGS = CONFIGS / "accelerate"
DEEPSPEED_CONFIGS = CONFIGS / "deepspeed"

STRATEGIES = ("single_gpu", "ddp", "zero2", "zero3", "zero3_offload", "multi_node")
DEEPSPEED_FILE = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json",
                  "multi_node": "zero2.json"}


class PlanError(ValueError):
    """An impossible launch; the message names the setting to change."""


@dataclass
class DevicePlan:
    strategy: str
    n_gpus: int                         # GPUs visible on each machine (0: CPU only)
    nodes: int
    ranks_per_node: int                 # training processes per machine
    rank_devices: list[str]             # local rank -> device it trains on
    reward_devices: list[list[str]]     # reward term -> device for each local rank
    reference_device: Optional[list[str]]  # device of the reference copy for each local rank; None = shared
    reward_names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reward_placement: str = "local"     # reward.placement: local (a copy per rank) | scorer (one scorer per device)
    reference_placement: str = "local"  # reference.placement, likewise

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def describe(self) -> str:
        """The human-readable plan `--dry-run` prints."""
        where = f"{self.n_gpus} GPU(s)" if self.n_gpus else "no GPU (CPU processes)"
        lines = [f"strategy {self.strategy}: {self.nodes} machine(s) x {self.ranks_per_node} training rank(s) = "
                 f"{self.world_size} process(es); each machine has {where}"]
        for i, dev in enumerate(self.rank_devices):
            lines.append(f"  rank {i} (local)   trains on {dev}")

        def per_rank(devs: list[str]) -> str:
            return devs[0] if len(set(devs)) == 1 else ", ".join(f"rank {i}: {d}" for i, d in enumerate(devs))

        def copies(placement: str) -> str:
            return ("   (one scorer process per device and machine holds one copy for every rank)"
                    if placement == "scorer" else "   (one copy per rank)")

        for name, devs in zip(self.reward_names, self.reward_devices):
            lines.append(f"  reward {name}   on {per_rank(devs)}{copies(self.reward_placement)}")
        if self.reference_device is None:
            lines.append("  reference   shared with the policy (trainable adapter switched off), on each rank's device")
        else:
            lines.append(f"  reference (frozen copy)   on {per_rank(self.reference_device)}"
                         f"{copies(self.reference_placement)}")
        for w in self.warnings:
            lines.append(f"  note: {w}")
        return "\n".join(lines)


def make_plan(strategy: str, n_gpus: int, reward_devices: list[str], reference_mode: str, reference_device: str,
              num_processes: Optional[int] = None, nodes: int = 1, quantization: Optional[str] = None,
              reward_names: Optional[list[str]] = None) -> DevicePlan:
    """The device plan for one machine (every machine of a multi-node run has the same layout).

    Training ranks take the lowest GPU indices (rank i trains on cuda:i: accelerate's placement). Without
    --num-processes they take every GPU that no reward model or reference copy names explicitly."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    names = reward_names or [f"term {i}" for i in range(len(reward_devices))]
    copy_ref = reference_mode == "copy"
    requested = list(reward_devices) + ([reference_device] if copy_ref else [])
    keys = [f"reward.terms.{i}.device" for i in range(len(reward_devices))] + (["reference.device"] if copy_ref else [])
    for key, name in zip(keys, requested):
        try:
            check_device_name(name, key)
        except ValueError as err:
            raise PlanError(str(err)) from None
    warnings = []
    if not copy_ref and reference_device != "auto":
        warnings.append(f"reference.device={reference_device} is ignored: reference.mode=shared uses the policy itself")
    if nodes < 1:
        raise PlanError(f"--nodes must be >= 1, got {nodes}")
    if strategy == "multi_node" and nodes < 2:
        raise PlanError("strategy multi_node needs at least 2 machines: pass --nodes N (or run under SLURM, which "
                        "sets SLURM_NNODES); on one machine use zero2")
    if strategy != "multi_node" and nodes > 1:
        raise PlanError(f"strategy {strategy} runs on one machine; use multi_node for {nodes} machines")
    if quantization and strategy in ("zero3", "zero3_offload"):
        raise PlanError(f"policy.quantization={quantization} (bitsandbytes) cannot be combined with {strategy}, which "
                        f"shards the weights; use ddp or zero2")
    if num_processes is not None and num_processes < 1:
        raise PlanError(f"--num-processes must be >= 1, got {num_processes}")

    if n_gpus == 0:  # CPU processes (tests, debugging): everything on the CPU
        if quantization:
            raise PlanError(f"policy.quantization={quantization} needs GPUs; this machine has none")
        for key, name in zip(keys, requested):
            if name.startswith("cuda"):
                raise PlanError(f"{key}={name}, but this machine has no GPU; use cpu or auto")
        ranks = num_processes or 1
        if strategy == "single_gpu" and ranks != 1:
            raise PlanError(f"strategy single_gpu runs 1 process, not {ranks}; use ddp for several")
        devs = place_auxiliary(requested, 0, ranks, "cpu")
        return DevicePlan(strategy, 0, nodes, ranks, ["cpu"] * ranks,
                          [[d] * ranks for d in devs[:len(reward_devices)]],
                          [devs[-1]] * ranks if copy_ref else None, names, warnings)

    named = {}
    for key, name in zip(keys, requested):
        idx = gpu_index(name)
        if name == "cuda":
            raise PlanError(f"{key}=cuda is ambiguous with several processes; name the GPU (cuda:N) or use auto")
        if idx is not None:
            if idx >= n_gpus:
                raise PlanError(f"{key}={name} does not exist: the machine has {n_gpus} GPU(s), "
                                f"cuda:0..cuda:{n_gpus - 1}")
            named.setdefault(idx, key)
    free = n_gpus - len(named)
    if strategy == "single_gpu":
        if num_processes not in (None, 1):
            raise PlanError(f"strategy single_gpu runs 1 process, not {num_processes}; use ddp or zero2 for several")
        ranks = 1
    else:
        ranks = num_processes if num_processes is not None else free
    if ranks < 1:
        raise PlanError(f"no GPU left for training: the machine has {n_gpus} GPU(s) and {len(named)} are dedicated "
                        f"({', '.join(sorted(named.values()))})")
    if ranks > free:
        dedicated = f", {len(named)} of them dedicated to {', '.join(sorted(named.values()))}" if named else ""
        raise PlanError(f"{ranks} training ranks need {ranks} GPUs, but the machine has {n_gpus}{dedicated}; "
                        f"lower --num-processes to {free} or less")
    for idx, key in sorted(named.items()):
        if idx < ranks:
            raise PlanError(f"{key}=cuda:{idx} is also the GPU of training rank {idx} (ranks train on cuda:0.."
                            f"cuda:{ranks - 1}, accelerate's placement); dedicate the highest-numbered GPUs instead "
                            f"(cuda:{n_gpus - 1}, cuda:{n_gpus - 2}, ...), or use auto with --num-processes")
    rank_devices = [f"cuda:{i}" for i in range(ranks)]
    per_rank = [place_auxiliary(requested, n_gpus, ranks, own) for own in rank_devices]
    reward = [[per_rank[r][i] for r in range(ranks)] for i in range(len(reward_devices))]
    reference = [per_rank[r][-1] for r in range(ranks)] if copy_ref else None
    if ranks < n_gpus and not any(d == "auto" for d in requested) and len(named) < n_gpus - ranks:
        warnings.append(f"{n_gpus - ranks - len(named)} GPU(s) stay idle")
    if any(d == "auto" for d in requested) and ranks == n_gpus:
        warnings.append("no GPU is left over: `auto` reward/reference devices share each rank's own GPU "
                        "(lower --num-processes to dedicate GPUs to them)")
    return DevicePlan(strategy, n_gpus, nodes, ranks, rank_devices, reward, reference, names, warnings)


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]       # variables to set (on top of the current environment)
    unset: list[str]          # variables to remove from it

    def shell(self) -> str:
        prefix = [f"env -u {v}" for v in self.unset]
        assigns = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join(prefix + assigns + [shlex.join(self.argv)])


def build_command(plan: DevicePlan, recipe: Optional[str], overrides: list[str], *,
                  mixed_precision: Optional[str] = None, machine_rank: Optional[int] = None,
                  main_address: Optional[str] = None, main_port: Optional[int] = None,
                  accelerate_config: Optional[Path] = None, deepspeed_config: Optional[Path] = None) -> Command:
    """`accelerate launch` for the plan. Never passes --gpu_ids: accelerate would set CUDA_VISIBLE_DEVICES and hide
    the GPUs dedicated to reward models and the reference."""
    strategy = plan.strategy
    config = accelerate_config or ACCELERATE_CONFIGS / f"{strategy}.yaml"
    argv = ["accelerate", "launch", "--config_file", str(Path(config).resolve()),
            "--num_processes", str(plan.world_size), "--num_machines", str(plan.nodes)]
    env: dict[str, str] = {}
    unset: list[str] = []
    deepspeed = strategy in DEEPSPEED_FILE
    if deepspeed:
        ds = deepspeed_config or DEEPSPEED_CONFIGS / DEEPSPEED_FILE[strategy]
        argv += ["--deepspeed_config_file", str(Path(ds).resolve())]
    elif deepspeed_config is not None:
        raise PlanError(f"--deepspeed-config is for the DeepSpeed strategies ({', '.join(DEEPSPEED_FILE)}), "
                        f"not {strategy}")
    if plan.n_gpus == 0:
        # docs/ARCHITECTURE.md, distributed traps: DDP on CPUs needs ACCELERATE_USE_CPU with a multi-process type; DeepSpeed must NOT
        # see it (accelerate would quietly drop DeepSpeed).
        if mixed_precision not in (None, "no"):
            raise PlanError(f"--mixed-precision {mixed_precision} needs GPUs; CPU processes train in float32")
        mixed_precision = "no"
        if deepspeed:
            unset.append("ACCELERATE_USE_CPU")
        else:
            env["ACCELERATE_USE_CPU"] = "1"
            if plan.world_size > 1:
                argv.append("--multi_gpu")
            else:
                argv.append("--cpu")
    elif mixed_precision is None:
        # the shipped files leave precision to the command line (accelerate refuses it in a file next to a DeepSpeed
        # JSON); bf16 is the GPU default, pass fp16 on GPUs without bf16
        mixed_precision = "bf16"
    argv += ["--mixed_precision", mixed_precision]
    if plan.nodes > 1:
        if machine_rank is None or main_address is None:
            raise PlanError("a multi-machine launch needs this machine's rank and the main machine's address: pass "
                            "--machine-rank/--main-address or set NODE_RANK (or MACHINE_RANK, SLURM_NODEID) and "
                            "MASTER_ADDR")
        if not 0 <= machine_rank < plan.nodes:
            raise PlanError(f"machine rank {machine_rank} is outside 0..{plan.nodes - 1}")
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_address,
                 "--main_process_port", str(main_port or 29500)]
    elif main_port is not None:
        argv += ["--main_process_port", str(main_port)]
    argv += ["-m", "detoxrl.train"]
    if recipe:
        argv += ["--config", str(recipe)]
    argv += list(overrides)
    return Command(argv, env, unset)


def environment_defaults(environ: Optional[dict] = None) -> dict[str, Optional[str]]:
    """Multi-machine settings from the environment (torchrun / SLURM conventions)."""
    e = os.environ if environ is None else environ
    return {"machine_rank": e.get("NODE_RANK") or e.get("MACHINE_RANK") or e.get("SLURM_NODEID"),
            "main_address": e.get("MASTER_ADDR") or e.get("MAIN_PROCESS_IP"),
            "main_port": e.get("MASTER_PORT"),
            "nodes": e.get("NUM_NODES") or e.get("SLURM_NNODES")}
