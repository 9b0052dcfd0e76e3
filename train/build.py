"""The trainer's setup: the accelerator, the preflight, the models, the optimizer and the loop's live state, built
once per run (train/loop.py calls `build_trainer`).

    Trainer   what a run holds for its length: accelerator, inputs, policy (prepared and unwrapped), reference,
              reward, judges, optimizer, scheduler
    Progress  what changes from step to step and a resume restores (checkpoint.TrainerState is its saved form)
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from detoxrl.train import assets
from detoxrl.train.alarms import AlarmMonitor
from detoxrl.train.checkpoint import TrainerState
from detoxrl.train.config import Config, config_hash, to_dict, to_yaml
from detoxrl.train.data import PromptSampler
from detoxrl.train.devices import gpu_index, place_auxiliary
from detoxrl.train.distributed import fill_deepspeed_config, make_accelerator, models_built_whole, zero_stage
from detoxrl.train.judges import Judge, build_judges, reward_toxicity_term
from detoxrl.train.models import (PolicyWithValue, build_policy, build_reference_copy, count_parameters, resolve_device,
                                  resolve_dtype)
from detoxrl.train.ppo_math import AdaptiveKLController, FixedKLController, RunningMoments
from detoxrl.train.preflight import RunInputs, preflight
from detoxrl.train.reward import RewardModel, build_reward
from detoxrl.train.rollout import sampling_mismatches
from detoxrl.train.scorers import (RemoteReference, RemoteRewardTerm, ScorerPool, local_layout, plan_scorers,
                                   start_scorers)
from detoxrl.train.tracking import package_versions, setup_logging

log = logging.getLogger("detoxrl.train")


@dataclass
class Trainer:
    """Everything a run holds for its length (built by `build_trainer`)."""
    cfg: Config
    accelerator: Any
    out: Path                      # run.output_dir
    inputs: RunInputs              # what the preflight read: tokenizer, training and held-out prompts
    policy: Any                    # PolicyWithValue as accelerate prepared it (DDP wrapper, DeepSpeed engine)
    unwrapped: Any                 # ... and unwrapped
    reference: Any                 # FrozenReference, RemoteReference (on a scorer), or None when it shares the
                                   # policy's base (adapter off)
    reward: RewardModel            # its terms: RewardTerm here, or RemoteRewardTerm on a scorer
    judges: list[Judge]
    tox_term: Any                  # the reward term whose classifier measures toxicity, or None
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    parameters: tuple[int, int]    # (total, trainable) of the policy
    scorers: Optional[ScorerPool] = None  # this rank's end of its machine's scorers (placement: scorer)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Progress:
    """The loop's state that a checkpoint saves (as a TrainerState) and a resume restores."""
    sampler: PromptSampler
    kl_ctl: Any                    # AdaptiveKLController | FixedKLController
    moments: Optional[RunningMoments]
    monitor: AlarmMonitor
    step: int = 0                  # steps done
    samples_seen: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)  # held-out "before" (and "after") figures

    def state(self, step: int, cfg: Config, world: int) -> TrainerState:
        return TrainerState(step=step, samples_seen=self.samples_seen, sampler=self.sampler.state_dict(),
                            kl_controller=self.kl_ctl.state_dict(),
                            reward_moments=self.moments.state_dict() if self.moments else None,
                            evaluation=self.evaluation, alarms=self.monitor.state_dict(), world_size=world,
                            config=to_dict(cfg), config_hash=config_hash(cfg), packages=package_versions())

    def restore(self, state: TrainerState) -> None:
        self.step, self.samples_seen = state.step, state.samples_seen
        self.sampler.load_state_dict(state.sampler)
        self.kl_ctl.load_state_dict(state.kl_controller)
        if self.moments is not None and state.reward_moments:
            self.moments.load_state_dict(state.reward_moments)
        self.evaluation = state.evaluation
        self.monitor.load_state_dict(state.alarms)


def new_progress(cfg: Config, sampler: PromptSampler) -> Progress:
    kl = cfg.ppo.kl
    return Progress(sampler, AdaptiveKLController(kl.init_coef, kl.target, kl.horizon) if kl.adaptive
                    else FixedKLController(kl.init_coef), RunningMoments() if cfg.reward.normalize else None,
                    AlarmMonitor(cfg.alarms))


def start_process(cfg: Config):
    """The accelerator, threads, logging, the output folder with config.yaml, and the seeds."""
    accelerator = make_accelerator(cfg.run.device, cfg.ppo.gradient_accumulation_steps)
    if cfg.run.cpu_threads:  # after the accelerator, which sets its own count for multi-CPU runs
        torch.set_num_threads(cfg.run.cpu_threads)
    setup_logging(accelerator.is_main_process)
    out = Path(cfg.run.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)  # the same start whatever ran before in this process (resumes restore all three)
    np.random.seed(cfg.run.seed)
    return accelerator


def build_trainer(cfg: Config) -> tuple[Trainer, Progress]:
    """Setup: accelerator, preflight (configs, tokenizers, data: bad input fails before any weights load), models
    (policy + value head, reference, reward, judges), optimizer and schedule, all prepared by accelerate; and the
    loop's state at step 0."""
    accelerator = start_process(cfg)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    # rank 0 builds the demo assets / downloads; others then read the cache. Models whole: under ZeRO-3 transformers
    # would otherwise load them inside zero.Init, whose collectives deadlock against the waiting ranks.
    with accelerator.main_process_first(), models_built_whole(accelerator):
        inputs = preflight(cfg)  # configs, tokenizers and data only: bad input fails here, before any weights load
    # a rank samples all k responses of its prompts (groups never straddle ranks)
    sampler = PromptSampler(len(inputs.prompts), cfg.ppo.batch_size // cfg.ppo.k, accelerator.process_index, world,
                            cfg.run.seed)
    log.info("%d training prompts (%s, split %s), %d process(es), global batch %d responses (%d per prompt)",
             len(inputs.prompts), cfg.data.dataset, cfg.data.split, world, cfg.ppo.batch_size * world, cfg.ppo.k)
    if is_main:
        for why in sampling_mismatches(cfg.generation):
            log.warning("sampling and scoring distributions differ: %s; the PPO update is off-policy by that much",
                        why)
    if zero_stage(accelerator) == 3 and cfg.policy.quantization:
        raise ValueError("policy.quantization (bitsandbytes) cannot be combined with DeepSpeed ZeRO-3, which shards "
                         "the weights: use the ddp or zero2 strategy")
    dtype = resolve_dtype(cfg.policy.dtype, accelerator.device, accelerator.mixed_precision)
    policy, reference, reward, judges, tox_term, scorers = build_models(cfg, accelerator, inputs, dtype)
    compile_policy(cfg, accelerator, policy)
    total_params, trainable_params = count_parameters(policy)
    log.info("policy %s (%s, %s): %s parameters, %s trainable (%.3f%%)", cfg.policy.model, inputs.kind, dtype,
             f"{total_params:,}", f"{trainable_params:,}", 100.0 * trainable_params / total_params)
    optimizer, scheduler = build_optimizer(cfg, policy)
    if zero_stage(accelerator) is not None:
        fill_deepspeed_config(accelerator, cfg.ppo.mini_batch_size, cfg.ppo.gradient_accumulation_steps,
                              cfg.ppo.max_grad_norm, policy.v_head.in_features)
    # the scheduler is NOT prepared: it steps once per optimizer step we take, identically in every strategy
    policy, optimizer = accelerator.prepare(policy, optimizer)
    trainer = Trainer(cfg, accelerator, Path(cfg.run.output_dir), inputs, policy, accelerator.unwrap_model(policy),
                      reference, reward, judges, tox_term, optimizer, scheduler, dtype,
                      (total_params, trainable_params), scorers)
    return trainer, new_progress(cfg, sampler)


def compile_policy(cfg: Config, accelerator, policy: PolicyWithValue) -> None:
    """ppo.compile, where torch.compile can trace the policy: not through ZeRO-3's parameter-gathering hooks, nor
    bitsandbytes' quantized layers (the run stays eager, with the reason logged)."""
    if not cfg.ppo.compile:
        return
    why = "DeepSpeed ZeRO-3 gathers the weights in module hooks" if zero_stage(accelerator) == 3 else \
        "policy.quantization (bitsandbytes layers)" if cfg.policy.quantization else None
    if why:
        log.warning("ppo.compile: the policy's passes stay eager (the loss maths are compiled): %s", why)
        return
    policy.compile_forward()
    log.info("ppo.compile: the PPO step's forward passes run through torch.compile (the first steps compile)")


def build_models(cfg: Config, accelerator, inputs: RunInputs, dtype: torch.dtype):
    """(policy, reference or None, reward, judges, the reward's toxicity term, scorers or None), each on its device;
    with a `scorer` placement the scorers are started first (they load while this rank loads the policy)."""
    device = accelerator.device
    shared_ref = cfg.reference.mode == "shared"
    reward_devices, reference_device = place_models(cfg, device)
    term_dtypes = reward_dtypes(cfg, reward_devices, dtype)
    scorers = start_machine_scorers(cfg, accelerator, inputs, reward_devices, reference_device, term_dtypes, dtype)
    try:
        with models_built_whole(accelerator):
            policy = build_policy(cfg.policy, inputs.policy_path, inputs.kind, device, dtype, shared_ref,
                                  cfg.run.seed, cfg.critic)
            if shared_ref:
                reference = None
            elif cfg.reference.placement == "scorer":
                reference = RemoteReference(scorers, next(s.index for s in scorers.specs if s.reference), str(dtype))
            else:
                reference = build_reference_copy(cfg.policy, cfg.reference, inputs.policy_path, inputs.kind,
                                                 reference_device, dtype)
            if cfg.reward.placement == "scorer":
                reward = RewardModel([remote_term(cfg, i, scorers, term_dtypes[i])
                                      for i in range(len(cfg.reward.terms))])
                judge_device = device  # judges stay on the rank's own device
            else:
                reward = build_reward(cfg.reward.terms, assets.resolve, reward_devices, term_dtypes)
                judge_device = reward_devices[cfg.evaluation.term]  # judges sit with the toxicity classifier
            judges = build_judges(cfg.judges, assets.resolve, judge_device,
                                  dtype if judge_device.type == "cuda" else torch.float32)
            tox_term = reward_toxicity_term(reward, cfg)
    except BaseException:
        if scorers is not None:
            scorers.close(grace=2.0)
        raise
    return policy, reference, reward, judges, tox_term, scorers


def start_machine_scorers(cfg: Config, accelerator, inputs: RunInputs, reward_devices: list[torch.device],
                          reference_device: Optional[torch.device], term_dtypes: list[torch.dtype],
                          dtype: torch.dtype) -> Optional[ScorerPool]:
    """The machine's scorers (train/scorers.py) for the models whose placement is `scorer`, or None."""
    remote_reward = cfg.reward.placement == "scorer"
    remote_ref = cfg.reference.mode == "copy" and cfg.reference.placement == "scorer"
    if not (remote_reward or remote_ref):
        return None
    name = lambda d: "cpu" if d.type == "cpu" else str(d)  # noqa: E731  (a CPU rank's device reads cpu:0)
    specs = plan_scorers([name(d) for d in reward_devices] if remote_reward else [None] * len(reward_devices),
                         name(reference_device) if remote_ref else None)
    paths = {"policy": inputs.policy_path, "kind": inputs.kind,
             "dtypes": {**{str(i): str(d) for i, d in enumerate(term_dtypes)}, "reference": str(dtype)}}
    rank = accelerator.process_index

    def share_port(port: Optional[int]) -> int:
        if accelerator.num_processes == 1:
            return port
        from accelerate.utils import gather_object

        local_rank = local_layout()[0]
        ports = dict(gather_object([(rank, port)]))
        return ports[rank - local_rank]  # ranks of a machine are consecutive (torchrun)

    return start_scorers(cfg, specs, paths, share_port, Path(cfg.run.output_dir))


def remote_term(cfg: Config, index: int, scorers: ScorerPool, dtype: torch.dtype) -> RemoteRewardTerm:
    from transformers import AutoConfig

    term = cfg.reward.terms[index]
    scorer = next(s.index for s in scorers.specs if index in s.terms)
    model_config = AutoConfig.from_pretrained(assets.resolve(term.model, "reward"),
                                              trust_remote_code=term.trust_remote_code)
    return RemoteRewardTerm(term, index, scorers, scorer, model_config, str(dtype))


def build_optimizer(cfg: Config, policy):
    """AdamW over the policy's and the critic's parameter groups, and the learning-rate schedule (per optimizer
    step: total_steps x ppo_epochs x mini-batches)."""
    from transformers import get_scheduler

    if cfg.ppo.estimator != "gae":  # no value loss: the head stays as it is and out of the optimizer (and DDP's buckets)
        policy.v_head.requires_grad_(False)
    # foreach: one call per step for all the LoRA tensors (the per-tensor loop is Python-bound: 15% of a small
    # model's update); the same arithmetic, bitwise, on the CPU
    optimizer = torch.optim.AdamW(param_groups(policy, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay, foreach=True)
    minibatches = cfg.ppo.batch_size // cfg.ppo.mini_batch_size
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.run.total_steps * cfg.ppo.ppo_epochs * minibatches)
    return optimizer, scheduler


def place_models(cfg: Config, device: torch.device) -> tuple[list[torch.device], Optional[torch.device]]:
    """Devices of the reward terms and of the reference copy (None when shared) for this rank (train/devices.py)."""
    copy_ref = cfg.reference.mode == "copy"
    requested = [t.device for t in cfg.reward.terms] + ([cfg.reference.device] if copy_ref else [])
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # a CPU run keeps `auto` on the CPU
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    names = place_auxiliary(requested, n_gpus, local_ranks, str(device))
    own = gpu_index(str(device))
    for key, name in zip([f"reward.terms.{i}.device" for i in range(len(cfg.reward.terms))] + ["reference.device"],
                         names):
        other = gpu_index(name)
        if other is not None and other < local_ranks and other != own:
            log.warning("%s=%s is also the GPU of training rank %d of this machine; it competes with that rank for "
                        "memory and time", key, name, other)
    devices = [resolve_device(n, device) for n in names]
    return devices[:len(cfg.reward.terms)], (devices[-1] if copy_ref else None)


def reward_dtypes(cfg: Config, devices: list[torch.device], policy_dtype: torch.dtype) -> list[torch.dtype]:
    """Each reward term's dtype (`auto`: the policy's on a GPU, float32 on the CPU)."""
    return [resolve_dtype(t.dtype, dev) if t.dtype != "auto" else
            (policy_dtype if dev.type == "cuda" else torch.float32) for t, dev in zip(cfg.reward.terms, devices)]


def param_groups(policy, cfg: Config) -> list[dict[str, Any]]:
    """The policy's trainable parameters, then the critic's (value head, critic adapter) at `critic.lr`."""
    critic_ids = {id(p) for p in policy.critic_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"name": "policy", "params": [p for p in trainable if id(p) not in critic_ids]},
              {"name": "critic", "params": [p for p in trainable if id(p) in critic_ids],
               "lr": cfg.critic.lr or cfg.optim.lr}]
    return [g for g in groups if g["params"]]

