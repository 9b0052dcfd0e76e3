"""`detoxrl-launch` / `python -m detoxrl.launch`: the exact `accelerate launch` command for a recipe and a strategy.

    detoxrl-launch --strategy zero2 --config RECIPE [key=value ...]            # print the command
    detoxrl-launch --strategy ddp --num-processes 6 --config RECIPE --dry-run  # the device plan, then the command
    detoxrl-launch --strategy zero3 --config RECIPE --run                      # run it

It reads the recipe (and overrides) for the reward / reference devices, works out how many training ranks the
machine's GPUs allow once dedicated devices are set aside, refuses impossible plans, and never hides GPUs from the
processes (no --gpu_ids, no CUDA_VISIBLE_DEVICES). The same device rule places the models at run time
(train/devices.py). Multi-node: NODE_RANK (or MACHINE_RANK, SLURM_NODEID), MASTER_ADDR, MASTER_PORT and
NUM_NODES (or SLURM_NNODES) come from the environment unless given as options.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from detoxrl.launch.plan import STRATEGIES, PlanError, build_command, environment_defaults, make_plan


def detect_gpus() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES respected), 0 without CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="detoxrl-launch", description="Print (or run) the accelerate launch command for a detoxrl recipe and a "
        "parallel strategy, with a checked device plan for training ranks, reward models and the reference.",
        epilog="Strategies: single_gpu (one process), ddp (a full copy per GPU; fastest when it fits), zero2 "
        "(optimizer states and gradients sharded), zero3 (weights sharded too), zero3_offload (and offloaded to CPU "
        "memory), multi_node (ZeRO-2 over several machines). See the README, section 'Distributed'.")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--config", type=Path, default=None, help="the run recipe (default: the offline demo recipe)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of each machine (default: the visible ones); 0 runs "
                   "CPU processes")
    p.add_argument("--num-processes", type=int, default=None, help="training ranks per machine (default: every GPU "
                   "not named as a reward/reference device)")
    p.add_argument("--nodes", type=int, default=None, help="machines (multi_node; default NUM_NODES / SLURM_NNODES)")
    p.add_argument("--machine-rank", type=int, default=None, help="this machine's rank (default NODE_RANK, "
                   "MACHINE_RANK or SLURM_NODEID)")
    p.add_argument("--main-address", default=None, help="address of machine 0 (default MASTER_ADDR)")
    p.add_argument("--main-port", type=int, default=None, help="port on machine 0 (default MASTER_PORT or 29500)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="precision (default: bf16 on GPUs; pass fp16 on GPUs without bf16: V100, T4). CPU "
                   "processes train in float32")
    p.add_argument("--accelerate-config", type=Path, default=None, help="another accelerate config file")
    p.add_argument("--deepspeed-config", type=Path, default=None, help="another DeepSpeed JSON (DeepSpeed "
                   "strategies); leave batch sizes, accumulation and clipping on \"auto\"")
    p.add_argument("--dry-run", action="store_true", help="print the device plan and the command; run nothing")
    p.add_argument("--run", action="store_true", help="run the command (exit status is the run's)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to detoxrl.train")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from detoxrl.train.cli import DEMO_RECIPE
    from detoxrl.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config or DEMO_RECIPE, args.overrides)
    except ConfigError as err:
        print(f"detoxrl-launch: config error: {err}", file=sys.stderr)
        return 2
    env = environment_defaults()
    nodes = args.nodes if args.nodes is not None else int(env["nodes"] or 1)
    machine_rank = args.machine_rank if args.machine_rank is not None else (
        int(env["machine_rank"]) if env["machine_rank"] is not None else None)
    main_port = args.main_port if args.main_port is not None else (int(env["main_port"]) if env["main_port"]
                                                                   else None)
    n_gpus = args.gpus if args.gpus is not None else detect_gpus()
    try:
        plan = make_plan(args.strategy, n_gpus, [t.device for t in cfg.reward.terms], cfg.reference.mode,
                         cfg.reference.device, args.num_processes, nodes, cfg.policy.quantization,
                         [f"{t.model} ({t.label})" for t in cfg.reward.terms])
        plan.reward_placement, plan.reference_placement = cfg.reward.placement, cfg.reference.placement
        command = build_command(plan, str(args.config) if args.config else None, args.overrides,
                                mixed_precision=args.mixed_precision, machine_rank=machine_rank,
                                main_address=args.main_address or env["main_address"], main_port=main_port,
                                accelerate_config=args.accelerate_config, deepspeed_config=args.deepspeed_config)
    except PlanError as err:
        print(f"detoxrl-launch: impossible plan: {err}", file=sys.stderr)
        return 2
    if args.dry_run or args.run:
        print(plan.describe(), file=sys.stderr if args.run else sys.stdout)
    if not args.run:
        print(command.shell())
        return 0
    if plan.nodes > 1:
        problem = unresolvable(args.main_address or env["main_address"])
        if problem:
            print(f"detoxrl-launch: {problem}", file=sys.stderr)
            return 2
    print(f"+ {command.shell()}", file=sys.stderr, flush=True)
    child_env = {k: v for k, v in os.environ.items() if k not in command.unset}
    child_env.update(command.env)
    accelerate = Path(sys.executable).parent / "accelerate"  # the accelerate of this environment
    argv_run = [str(accelerate) if accelerate.exists() else command.argv[0], *command.argv[1:]]
    return subprocess.call(argv_run, env=child_env)


def unresolvable(address: str) -> Optional[str]:
    """Why the main machine's address cannot be reached by name (None if it resolves): torch's rendezvous would
    otherwise retry it on every machine without end (a SLURM NodeName that is not a hostname, a typo)."""
    try:
        socket.getaddrinfo(address, None)
    except (socket.gaierror, UnicodeError) as err:
        return (f"the main machine's address {address!r} does not resolve here ({err}): every machine would wait "
                f"for it without end. Pass --main-address (or MAIN_PROCESS_IP / MASTER_ADDR) with an address every "
                f"machine reaches, e.g. its IP")
    return None


if __name__ == "__main__":
    raise SystemExit(main())
