"""Data-parallel training for real: 2 processes on gloo (CPU), under DDP, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with
CPU offload, each launched with the CPU command that its accelerate config file documents, as a user types it. Each
run checks that 2 processes ran, that ranks saw different prompts, that their trainable weights are identical after
several steps and that losses are finite; the strategies must end with the same adapter. ZeRO-3 resumes exactly from
a checkpoint while generating on the sharded model (`synced_gpus`), with responses ending at different lengths per
rank (without `synced_gpus` that deadlocks; the timeout turns a hang into a failure). An equivalence test runs one
PPO update on a fixed rollout as 1 process x 8 rows and 2 processes x 4 rows. One launch per strategy (DDP, ZeRO-2)
trains every advantage estimator and critic mode on both policy kinds and resumes each bitwise; in the same launch
the reward and reference copy move to scorer processes (2 training ranks + a reward scorer + a reference scorer),
bitwise equal to local scoring, and (DDP) a killed scorer stops both ranks with its name after a checkpoint from
which the run resumes exactly. GPU-only paths are marked `gpu`.

This file is also the worker the equivalence and estimator tests launch: `python tests/test_distributed.py
equivalence|combos ...`.

Environment: TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) caches the op DeepSpeed compiles on first use
(~40 s once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO_GAE
from documented import cpu_launch

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "configs" / "ppo" / "demo.yaml"
ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"
STRATEGY_TIMEOUT = 240  # seconds per launch; a hang (the ZeRO-3 generation deadlock) fails instead of blocking CI

# The demo's tiny policy (a T5 fine-tuned to summarise: its responses end at different lengths), a shared reference,
# 3 PPO steps of 4 prompts per rank, 2 epochs of 2 mini-batches of 2 micro-batches: the runs are identical in every
# strategy, so their final adapters must agree.
RUN_OVERRIDES = [*DEMO_GAE, "run.total_steps=3", "run.cpu_threads=1", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                 "ppo.gradient_accumulation_steps=2", "ppo.ppo_epochs=2", "generation.max_new_tokens=24",
                 "optim.scheduler=linear", "optim.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
                 "logging.progress_bar=false", "logging.sample_every=0", "evaluation.before_after=true",
                 "evaluation.num_samples=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DETOXRL_DEBUG"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def run_bounded(argv: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run `argv` in its own process group; on timeout kill the whole group (torchrun's workers too) and fail."""
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv[:8])} ... did not finish in {timeout} s (hung?). Output tail:\n{out[-4000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def launch(strategy: str, out: Path, overrides: list[str], deepspeed_config: Path | None = None) -> str:
    """The strategy's documented CPU command (its config file's header) on 2 CPU processes, exactly as a user types
    it; returns the output. `deepspeed_config` replaces the shipped JSON (test-only). Each rank dumps debug records
    to out/debug."""
    argv, env = cpu_launch(strategy, str(Path(sys.executable).parent / "accelerate"), DEMO_RECIPE, free_port(),
                           extra_flags=["--deepspeed_config_file", str(deepspeed_config)] if deepspeed_config else [])
    argv += [*overrides, f"run.output_dir={out}"]
    result = run_bounded(argv, child_env(DETOXRL_DEBUG_DIR=str(out / "debug"), **env), STRATEGY_TIMEOUT)
    assert result.returncode == 0, f"{strategy} run failed:\n{result.stdout[-6000:]}"
    return result.stdout


def demo_overrides(assets: dict[str, Path]) -> list[str]:
    return [f"policy.model={assets['policy']}", f"reward.terms.0.model={assets['reward']}",
            f"data.dataset={assets['data']}"]


def zero3_tiny_json(folder: Path) -> Path:
    """The shipped ZeRO-3 config with every parameter sharded (the tiny model's would all fall under the threshold)."""
    cfg = json.loads(ZERO3_JSON.read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = folder / "zero3_all_sharded.json"
    path.write_text(json.dumps(cfg))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_st(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return {**load_st(out / "final" / "adapter_model.safetensors"),
            **{f"v_head.{k}": v for k, v in load_st(out / "final" / "value_head.safetensors").items()}}


@pytest.fixture(scope="module")
def strategy_runs(demo_assets, tmp_path_factory):
    """One run per strategy, made on first use and shared by the tests below."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("strategies")

    def run(strategy: str) -> Path:
        if strategy not in cache:
            out = root / strategy
            extra = {"ddp": [], "zero2": ["reference.mode=copy"],  # the frozen copy, outside the engine
                     "zero3": [], "zero3_offload": []}[strategy]
            ds = zero3_tiny_json(root) if strategy == "zero3" else None
            launch(strategy, out, [*demo_overrides(demo_assets), *RUN_OVERRIDES, *extra], ds)
            cache[strategy] = out
        return cache[strategy]

    return run


def check_lockstep_run(out: Path, zero_stage):
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and len(info["devices_by_rank"]) == 2          # really 2 processes
    assert info["zero_stage"] == zero_stage and info["mixed_precision"] == "no"
    assert info["distributed_type"] == ("MULTI_CPU" if zero_stage is None else "DEEPSPEED")
    ranks = [read_jsonl(out / "debug" / f"rank-{r:05d}.jsonl") for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    for a, b in zip(*ranks):                                                         # different prompts per step
        assert a["step"] == b["step"] and len(a["prompt_indices"]) == len(b["prompt_indices"]) == 4
        assert not set(a["prompt_indices"]) & set(b["prompt_indices"])
        assert a["skipped"] == b["skipped"] == 0
        assert all(torch.isfinite(torch.tensor(x["loss"])).all() for x in (a, b)) and len(a["loss"]) == 8
    w0, w1 = (load_st(out / "debug" / f"rank-{r:05d}-trainable.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)    # identical on both ranks
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["ppo/loss/total"] is not None and m["ppo/grad_norm"] is not None for m in metrics)
    assert metrics[0]["lr"] != metrics[-1]["lr"]                                     # the schedule moved
    # the saved adapter is the full (consolidated) one: it equals each rank's weights
    final = final_weights(out)
    for name, value in w0.items():
        short = name.replace("lm.", "", 1).replace(".default.", ".")
        assert torch.equal(final[short], value), name
    ckpt = out / "checkpoints" / "step-000003"
    from detoxrl.train.checkpoint import is_valid
    assert is_valid(ckpt) is None
    if zero_stage is not None:
        shards = sorted(p.name for p in (ckpt / "engine" / "state").glob("*optim_states.pt"))
        assert len(shards) == 2 and not (ckpt / "optimizer.pt").exists()
    return info, ranks


@pytest.mark.distributed
@pytest.mark.parametrize("strategy, stage", [("ddp", None), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_two_ranks_train_in_lockstep(strategy_runs, strategy, stage):
    out = strategy_runs(strategy)
    info, ranks = check_lockstep_run(out, stage)
    if strategy == "zero2":
        assert info["devices"]["reference"] == "cpu" and info["deepspeed"]["gradient_accumulation_steps"] == 2
        assert info["deepspeed"]["train_micro_batch_size_per_gpu"] == 1 and info["deepspeed"]["train_batch_size"] == 4
    if strategy == "zero3":  # responses ended at different lengths on the two ranks, and nothing hung
        assert any(max(a["response_lengths"]) != max(b["response_lengths"]) for a, b in zip(*ranks))
    if strategy == "zero3_offload":
        assert info["deepspeed"]["offload_optimizer"] == info["deepspeed"]["offload_param"] == "cpu"


@pytest.mark.distributed
def test_strategies_end_with_the_same_adapter(strategy_runs):
    """DDP, ZeRO-2 (with a frozen reference copy), ZeRO-3 (every weight sharded) and ZeRO-3 with CPU offload compute
    the same updates."""
    ddp, *others = (final_weights(strategy_runs(s)) for s in ("ddp", "zero2", "zero3", "zero3_offload"))
    for other in others:
        assert other.keys() == ddp.keys()
        for k in ddp:
            torch.testing.assert_close(other[k], ddp[k], atol=2e-6, rtol=1e-4)
    moved = max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k)
    assert moved > 1e-4  # the comparison is not between untrained adapters (LoRA B starts at zero)


@pytest.mark.distributed
def test_zero3_resumes_exactly_with_sharded_generation(strategy_runs, demo_assets, tmp_path):
    """Resume the ZeRO-3 run from its step-2 checkpoint, this time generating on the sharded model (parameters
    fetched per layer and token, ranks stepping together until both are done): step 3 must reproduce the run."""
    full = strategy_runs("zero3")
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    launch("zero3", out, [*demo_overrides(demo_assets), *RUN_OVERRIDES, "generation.zero3_gather_weights=false"],
           zero3_tiny_json(tmp_path))
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"].endswith("step-000002")
    assert [r["step"] for r in read_jsonl(out / "debug" / "rank-00000.jsonl")] == [3]
    got, want = final_weights(out), final_weights(full)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-6)


@pytest.mark.distributed
def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(strategy_runs, demo_assets, tmp_path):
    """ZeRO shards do not fit another strategy: a DDP checkpoint under ZeRO-2 is refused with the reason."""
    out = tmp_path / "switched"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(strategy_runs("ddp") / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    argv = [sys.executable, "-m", "detoxrl.launch", "--strategy", "zero2", "--gpus", "0", "--num-processes", "2",
            "--main-port", str(free_port()), "--run", "--config", str(DEMO_RECIPE), *demo_overrides(demo_assets),
            *RUN_OVERRIDES, f"run.output_dir={out}"]
    result = run_bounded(argv, child_env(), STRATEGY_TIMEOUT)
    assert result.returncode != 0
    assert "was written without DeepSpeed, this run is under DeepSpeed ZeRO-2 on 2 process(es)" in result.stdout


# ---- one PPO update on a fixed rollout: 1 process x 8 rows == 2 processes x 4 rows --------------------------------
def equivalence_worker(argv: list[str]) -> None:
    """Build the policy (tiny T5 + SFT adapter, shared reference), take this rank's rows of a fixed 8-row rollout,
    compute reference log-probs, run ONE `ppo_update` and save the trainable weights (rank 0) and the reference
    log-probs (every rank)."""
    import argparse

    from detoxrl.train.config import load_config
    from detoxrl.train.distributed import (fill_deepspeed_config, gathered_trainable, make_accelerator,
                                           models_built_whole, zero_stage)
    from detoxrl.train.experience import Experience
    from detoxrl.train.update import ppo_update
    from detoxrl.train.models import build_policy, reference_logprobs
    from detoxrl.train.rollout import pad_prompts
    from detoxrl.train.ppo_math import logprobs_from_logits
    from safetensors.torch import save_file

    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--out")
    p.add_argument("--gas", type=int, default=1)
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = 8 // world
    cfg = load_config(None, [f"policy.model={a.model}", f"policy.adapter={a.adapter}", "reference.mode=shared",
                             f"ppo.batch_size={rows}", f"ppo.mini_batch_size={rows}",
                             f"ppo.gradient_accumulation_steps={a.gas}", "ppo.ppo_epochs=1", "optim.lr=1.0",
                             "optim.adam_eps=1.0", "ppo.max_grad_norm=100.0", "ppo.vf_coef=0.5"])
    accelerator = make_accelerator("auto", a.gas)
    torch.set_num_threads(1)
    device = accelerator.device
    with models_built_whole(accelerator):
        policy = build_policy(cfg.policy, a.model, "seq2seq", device, torch.float32, True, cfg.run.seed)
    params = [q for q in policy.parameters() if q.requires_grad]
    # Adam's first step is lr * g / (|g| + eps): with eps = 1 and small gradients it is proportional to g, so the
    # comparison sees the gradient's scale, not only its sign.
    optimizer = torch.optim.AdamW(params, lr=1.0, eps=1.0, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if zero_stage(accelerator) is not None:
        fill_deepspeed_config(accelerator, rows, a.gas, cfg.ppo.max_grad_norm, policy.v_head.in_features)
    engine, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(engine)

    g = torch.Generator().manual_seed(1234)  # the same fixed rollout in every process
    prompt_lens = torch.randint(3, 10, (8,), generator=g).tolist()
    prompts = [torch.randint(3, 700, (n,), generator=g).tolist() + [1] for n in prompt_lens]
    T = 7
    response_ids = torch.randint(3, 700, (8, T), generator=g)
    lengths = torch.randint(1, T + 1, (8,), generator=g)   # unequal token counts per rank
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    advantages, returns, old_values = (torch.randn(8, T, generator=g) for _ in range(3))
    advantages = advantages * 100  # gradients well above Adam's eps-level noise floor (see eps above)
    mine = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
    prompt_ids, prompt_mask = pad_prompts(prompts[mine], 0, False, device)
    response_ids = response_ids[mine].to(device)
    stage = zero_stage(accelerator)
    ref_logp = reference_logprobs(unwrapped, None, prompt_ids, prompt_mask, response_ids, 1.0,
                                  forward=engine if stage else None)
    with torch.no_grad():
        logits, _ = engine(prompt_ids, prompt_mask, response_ids)
        old_logp = logprobs_from_logits(logits, response_ids, 1.0).float()
    batch = Experience(prompt_ids, prompt_mask, response_ids, mask[mine].to(device), old_logp,
                        old_values[mine].to(device), advantages[mine].to(device), returns[mine].to(device))
    result = ppo_update(accelerator, engine, optimizer, scheduler, batch, cfg.ppo, 1.0, shuffle_seed=7)
    assert result.skipped == 0, result
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(ref_logp.cpu(), out / f"ref-logp-{accelerator.process_index}.pt")
    with gathered_trainable(accelerator, engine):
        weights = {k: v.detach().float().cpu().clone() for k, v in unwrapped.trainable_state_dict().items()}
    save_file(weights, str(out / f"rank-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()


def run_equivalence(kind: str, out: Path, models: dict[str, Path], gas: int) -> None:
    worker = [str(Path(__file__).resolve()), "equivalence", "--model", str(models["t5"]), "--adapter",
              str(models["t5_sft_adapter"]), "--out", str(out), "--gas", str(gas)]
    env = child_env()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    if kind == "single":
        argv = [sys.executable, *worker]
    elif kind == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        argv = [accelerate, "launch", "--multi_gpu", *common, *worker]
    else:
        argv = [accelerate, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml"),
                "--deepspeed_config_file", str(zero3_tiny_json(out.parent)), *common, *worker]
    result = run_bounded(argv, env, STRATEGY_TIMEOUT)
    assert result.returncode == 0, result.stdout[-6000:]


@pytest.fixture(scope="module")
def single_process_update(test_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("equivalence") / "single"
    run_equivalence("single", out, test_models, gas=1)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("kind, gas", [("ddp", 2), ("zero3", 2)])
def test_one_update_is_the_same_on_1x8_and_2x4(test_models, single_process_update, tmp_path, kind, gas):
    """Token-level loss normalisation over the global mini-batch makes the update independent of how the rows are
    split over ranks and micro-batches, although the ranks hold different numbers of response tokens."""
    single = single_process_update
    run_equivalence(kind, tmp_path / kind, test_models, gas=gas)
    want = load_st(single / "rank-0.safetensors")
    start = {k: v for k, v in load_st(test_models["t5_sft_adapter"] / "adapter_model.safetensors").items()}
    for r in (0, 1):
        got = load_st(tmp_path / kind / f"rank-{r}.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-7, rtol=1e-6)
    lora_b = [k for k in want if "lora_B" in k]
    moved = max((want[k] - start[k.replace("lm.", "", 1).replace(".default.", ".")]).abs().max().item()
                for k in lora_b)
    assert moved > 1e-3  # so 2e-7 is a tight tolerance on the update
    # the shared reference (SFT adapter as a frozen second adapter, switched in around the forward) matches too
    ref_single = torch.load(single / "ref-logp-0.pt")
    ref_split = torch.cat([torch.load(tmp_path / kind / f"ref-logp-{r}.pt") for r in (0, 1)])
    T = min(ref_single.shape[1], ref_split.shape[1])
    torch.testing.assert_close(ref_split[:, :T], ref_single[:, :T], atol=1e-5, rtol=1e-5)


# ---- every estimator and critic mode, both policy kinds, one launch per strategy (issue 9) -------------------------
# (name, overrides): the estimators and critic modes, each also carrying some of the other new options so that these
# run on 2 ranks too (relative value clip, std-only reward scaling, decoupled lambda, both other loss aggregations,
# KL as a loss, a critic warm-up that the resume crosses). Dr. GRPO (grpo without std scaling) differs from grpo only
# in group-local maths, tested in test_ppo_math.py and test_train.py.
COMBOS = [
    ("gae-shared", ["critic.mode=shared", "critic.value_clip=relative", "reward.normalize=true",
                    "reward.normalize_shift_mean=false", "reference.mode=copy", "reference.device=cpu"]),
    ("gae-detached", ["critic.mode=detached", "critic.lam=1.0", "ppo.loss_aggregation=seq_mean_token_mean"]),
    ("gae-adapter", ["critic.mode=adapter", "critic.lr=0.003", "critic.warmup_steps=1", "critic.value_clip=none"]),
    ("rloo", ["ppo.estimator=rloo", "ppo.k=2"]),
    ("grpo", ["ppo.estimator=grpo", "ppo.k=2", "ppo.kl.mode=loss", "ppo.kl.estimator=k3"]),
    ("reinforce-pp", ["ppo.estimator=reinforce_pp", "ppo.k=2", "ppo.loss_aggregation=token_sum_norm"]),
]
COMBO_RUN = [*DEMO_GAE, "run.total_steps=2", "run.cpu_threads=1", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
             "generation.max_new_tokens=8", "optim.lr=0.003", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
             "logging.progress_bar=false", "logging.sample_every=0", "logging.tensorboard=false",
             "evaluation.before_after=false"]


def kind_overrides(kind: str, paths: dict[str, str]) -> list[str]:
    """seq2seq: the demo's T5 summariser and toxicity classifier; causal: the tiny GPT-2 with an IMDb classifier (its
    own tokenizer) on 2-8 token review prompts."""
    if kind == "seq2seq":
        return [f"policy.model={paths['t5']}", f"reward.terms.0.model={paths['t5_reward']}",
                f"data.dataset={paths['t5_data']}"]
    return [f"policy.model={paths['gpt2']}", "policy.kind=causal", "policy.lora.target_modules=[c_attn]",
            f"reward.terms.0.model={paths['gpt2_reward']}", "reward.terms.0.label=POSITIVE",
            f"data.dataset={paths['gpt2_data']}", "data.text_field=text", "data.template='{text}'",
            "data.prompt_tokens_range=[2,8]", "data.max_prompt_tokens=16", "data.reference_field=null"]


def combos_worker(argv: list[str]) -> None:
    """Under `accelerate launch` (2 processes): for every (kind, combination) train 2 steps with a checkpoint each step,
    then resume a copy of the step-1 checkpoint to step 2, in ONE process group (a launch costs more than all the runs).
    Rank 0 writes one JSON line of facts per combination to <out>/combos.jsonl; the test asserts on them."""
    import accelerate
    from accelerate.utils import gather_object

    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train

    # train() ends with accelerator.end_training(), which destroys the process group; the runs here share it
    accelerate.Accelerator.end_training = lambda self: None
    out, paths = Path(argv[0]), json.loads(Path(argv[1]).read_text())

    def trainable(result) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in result.policy.trainable_state_dict().items()}

    for kind in ("seq2seq", "causal"):
        for name, extra in COMBOS:
            root = out / f"{kind}-{name}"
            base = [*kind_overrides(kind, paths), *COMBO_RUN, *extra]
            os.environ["DETOXRL_DEBUG_DIR"] = str(root / "debug")
            straight = train(load_config(DEMO_RECIPE, [*base, f"run.output_dir={root / 'straight'}"]))
            w_straight = trainable(straight)
            if (kind, name) == ("seq2seq", "gae-shared"):
                scorer_twin = straight  # scorers_in_launch repeats it with its reward and reference on scorers
            state = accelerate.PartialState()  # (after train() has set it up, with gloo on CPUs)
            if state.is_main_process:
                shutil.copytree(root / "straight" / "checkpoints" / "step-000001",
                                root / "resumed" / "checkpoints" / "step-000001")
            state.wait_for_everyone()
            os.environ["DETOXRL_DEBUG_DIR"] = str(root / "debug_resumed")
            resumed = train(load_config(DEMO_RECIPE, [*base, f"run.output_dir={root / 'resumed'}"]))
            w_resumed = trainable(resumed)
            ranks = gather_object([w_straight])
            if state.is_main_process:
                init = load_st(root / "straight" / "checkpoints" / "step-000001" / "adapter_model.safetensors")
                timeless = [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))}
                            for m in (straight.metrics[-1], resumed.metrics[-1])]
                debug = [read_jsonl(root / "debug" / f"rank-{r:05d}.jsonl") for r in (0, 1)]
                record = {
                    "kind": kind, "name": name, "world_size": state.num_processes,
                    "distributed_type": state.distributed_type.value,
                    "steps": [[m["step"] for m in straight.metrics], [m["step"] for m in resumed.metrics]],
                    "finite_losses": all(all(x == x and abs(x) != float("inf") for x in d["loss"]) and d["loss"]
                                         for rank in debug for d in rank),
                    "ranks_identical": all(r.keys() == w_straight.keys() and all(torch.equal(r[k], w_straight[k])
                                                                                 for k in r) for r in ranks),
                    "resume_bitwise": w_resumed.keys() == w_straight.keys() and all(
                        torch.equal(w_resumed[k], w_straight[k]) for k in w_straight),
                    "resume_metrics_equal": timeless[0].keys() == timeless[1].keys() and all(
                        x == y or (x != x and y != y) for x, y in ((timeless[0][k], timeless[1][k])
                                                                   for k in timeless[0])),  # (nan == nan here)
                    "prompts_per_rank": [len(d["prompt_indices"]) for rank in debug for d in rank],
                    "responses_per_rank": [len(d["response_lengths"]) for rank in debug for d in rank],
                    "ranks_share_no_prompt": all(not set(a["prompt_indices"]) & set(b["prompt_indices"])
                                                 for a, b in zip(*debug)),
                    "policy_moved": max((w_straight[k] - init[k.replace("lm.", "", 1).replace(".default.", ".")])
                                        .abs().max().item() for k in w_straight if ".default." in k and "lora_B" in k),
                    "critic_keys": sorted({k.split(".")[0] if k.startswith("v_head") else "critic_adapter"
                                           for k in w_straight if k.startswith("v_head") or ".critic." in k}),
                    "value_loss_finite": math.isfinite(straight.metrics[-1]["ppo/loss/value"]),
                    "policy_moved_in_step_1": max(v.abs().max().item() for k, v in init.items() if "lora_B" in k),
                }
                with open(out / "combos.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            state.wait_for_everyone()
    scorers_in_launch(out, paths, trainable, scorer_twin)


# reward and reference copy on scorer processes (2 ranks + 1 reward scorer + 1 reference scorer) vs the same run with
# both local: `per_rank` batching scores each rank's texts as `local` does, so everything must be bitwise equal
SCORERS = ["reward.placement=scorer", "reference.placement=scorer", "scorer.batching=per_rank", "scorer.timeout=60"]


def scorers_in_launch(out: Path, paths: dict[str, str], trainable, local_run) -> None:
    """In the combos launch: the seq2seq gae-shared combination again with its reward and reference copy on scorers
    (2 steps), to equal `local_run` (that combination's straight run). DDP also kills the reference scorer in step 2
    (every rank stops with the named error after writing the step-1 checkpoint, which checkpoint.every_steps=0 would
    not have written) and resumes with fresh scorers to step 2. Rank 0 writes <out>/scorers.json."""
    import accelerate
    from accelerate.utils import gather_object

    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train
    from detoxrl.train.scorers import ScorerError

    base = [*kind_overrides("seq2seq", paths), *COMBO_RUN, *dict(COMBOS)["gae-shared"], *SCORERS]
    root = out / "scorers"
    state = accelerate.PartialState()
    os.environ["DETOXRL_DEBUG_DIR"] = str(root / "debug")
    run = train(load_config(DEMO_RECIPE, [*base, f"run.output_dir={root / 'scorer'}"]))
    weights, local_weights = trainable(run), trainable(local_run)
    killed = state.distributed_type.value == "MULTI_CPU"
    errors, resumed, eval_errors, eval_rerun = [], None, [], None
    if killed:
        os.environ["DETOXRL_TEST_SCORER_FAULT"] = "1:die@2"  # scorer 1 (the reference) dies at its 2nd request
        try:
            train(load_config(DEMO_RECIPE, [*base, "checkpoint.every_steps=0", f"run.output_dir={root / 'killed'}"]))
            error = None
        except ScorerError as err:
            error = str(err)
        del os.environ["DETOXRL_TEST_SCORER_FAULT"]
        errors = gather_object([error])
        resumed = train(load_config(DEMO_RECIPE, [*base, "checkpoint.every_steps=0",
                                                  f"run.output_dir={root / 'killed'}"]))
        # the reward scorer dies in the held-out evaluation after training (its round 5: 2 before training, the
        # step's reward and P(toxic), then the evaluation's first); the rerun redoes only the evaluation
        in_eval = [*base, "run.total_steps=1", "checkpoint.every_steps=0", "evaluation.before_after=true",
                   "evaluation.num_samples=4", "evaluation.samples_per_prompt=1", f"run.output_dir={root / 'eval'}"]
        os.environ["DETOXRL_TEST_SCORER_FAULT"] = "0:die@5"
        try:
            train(load_config(DEMO_RECIPE, in_eval))
            error = None
        except ScorerError as err:
            error = str(err)
        del os.environ["DETOXRL_TEST_SCORER_FAULT"]
        eval_errors = gather_object([error])
        eval_rerun = train(load_config(DEMO_RECIPE, in_eval))
    if state.is_main_process:
        def timeless(m):
            return {k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))}

        def equal(a, b):
            return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        def same_metrics(a, b):
            return [timeless(m) for m in a] == [timeless(m) for m in b]

        record = {
            "killed": killed, "weights_equal": equal(local_weights, weights),
            "metrics_equal": same_metrics(local_run.metrics, run.metrics), "metric_keys": sorted(run.metrics[-1]),
            "policy_moved": max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k),
            "run_info": json.loads((root / "scorer" / "run_info.json").read_text()), "errors": errors}
        if killed:
            record.update({
                "killed_checkpoints": sorted(p.name for p in (root / "killed" / "checkpoints").iterdir()),
                "resumed_steps": [m["step"] for m in resumed.metrics],
                "resume_weights_equal": equal(trainable(resumed), weights),
                "resume_metrics_equal": same_metrics(resumed.metrics, run.metrics[1:]),
                "scorer_logs": sorted(p.name for p in (root / "killed" / "scorers").iterdir()),
                "eval_errors": eval_errors, "eval_checkpoints": sorted(p.name for p in (root / "eval" / "checkpoints")
                                                                       .iterdir()),
                "eval_rerun_steps": [m["step"] for m in eval_rerun.metrics],
                "eval_rerun_has_after": sorted(eval_rerun.evaluation or {})})
        (out / "scorers.json").write_text(json.dumps(record))
    state.wait_for_everyone()


@pytest.fixture(scope="module")
def combo_paths(demo_assets, test_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("combo_paths") / "paths.json"
    path.write_text(json.dumps({"t5": str(demo_assets["policy"]), "t5_reward": str(demo_assets["reward"]),
                                "t5_data": str(demo_assets["data"]), "gpt2": str(test_models["gpt2"]),
                                "gpt2_reward": str(test_models["distilbert_imdb"]),
                                "gpt2_data": str(test_models["imdb"])}))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_every_estimator_and_critic_trains_both_kinds_on_two_ranks_and_resumes_bitwise(combo_paths, tmp_path,
                                                                                       strategy):
    """DDP and ZeRO-2, 2 CPU processes, one launch each: every (policy kind, estimator / critic mode) trains 2 steps
    with finite losses, identical trainable weights on both ranks, groups of k responses kept on one rank, and
    1 step + resume 1 step == 2 steps, bitwise (weights and metrics)."""
    accelerate_bin = str(Path(sys.executable).parent / "accelerate")
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    env = child_env()
    if strategy == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        flags = ["--multi_gpu"]
    else:
        flags = ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"), "--deepspeed_config_file",
                 str(REPO / "configs" / "deepspeed" / "zero2.json")]
    argv = [accelerate_bin, "launch", *flags, *common, str(Path(__file__).resolve()), "combos", str(tmp_path),
            str(combo_paths)]
    result = run_bounded(argv, env, 2 * STRATEGY_TIMEOUT)
    assert result.returncode == 0, result.stdout[-6000:]
    records = read_jsonl(tmp_path / "combos.jsonl")
    assert [(r["kind"], r["name"]) for r in records] == [(k, n) for k in ("seq2seq", "causal") for n, _ in COMBOS]
    for r in records:
        where = f"{strategy} {r['kind']} {r['name']}: {r}"
        assert r["world_size"] == 2 and r["distributed_type"] == ("MULTI_CPU" if strategy == "ddp" else "DEEPSPEED")
        assert r["steps"] == [[1, 2], [2]], where
        assert r["finite_losses"] and r["ranks_identical"] and r["ranks_share_no_prompt"], where
        assert r["resume_bitwise"] is True and r["resume_metrics_equal"] is True, where
        k = 2 if r["name"] in ("rloo", "grpo", "reinforce-pp") else 1
        assert set(r["responses_per_rank"]) == {4} and set(r["prompts_per_rank"]) == {4 // k}, where
        assert r["policy_moved"] > 0, where                    # the policy trained in step 2
        # ... and in step 1 too (its LoRA B starts at 0), except during the critic's warm-up
        assert (r["policy_moved_in_step_1"] == 0) is (r["name"] == "gae-adapter"), where
        critic_free = k == 2
        assert r["value_loss_finite"] is not critic_free, where  # no value loss without a critic
        assert r["critic_keys"] == ([] if critic_free else ["critic_adapter", "v_head"] if r["name"] == "gae-adapter"
                                    else ["v_head"]), where
    check_scorers(json.loads((tmp_path / "scorers.json").read_text()))


def check_scorers(r: dict) -> None:
    """Scorer placement == local placement bitwise (weights, metrics), one copy of each model per scorer; (DDP) a
    killed scorer stops both ranks with its name after a checkpoint; the resume (fresh scorers) continues exactly;
    one killed in the held-out evaluation after training leaves a checkpoint, and the rerun only evaluates."""
    assert r["weights_equal"] is True and r["metrics_equal"] is True and r["policy_moved"] > 0
    assert {"time/wait_reward", "time/wait_reference"} <= set(r["metric_keys"])
    scorers = r["run_info"]["scorers"]
    assert [(s["machine"], s["scorer"], s["device"], len(s["models"])) for s in scorers] == [(0, 0, "cpu", 1),
                                                                                             (0, 1, "cpu", 1)]
    assert scorers[0]["models"][0]["model"].startswith("reward term 0") and scorers[0]["models"][0]["bytes"] > 0
    assert scorers[1]["models"][0]["model"].startswith("reference") and scorers[1]["process_rss_bytes"] > 0
    assert r["run_info"]["devices"]["reference"] == "cpu (scorer 1)"
    if not r["killed"]:
        return
    assert len(r["errors"]) == 2 and all(e and e.startswith("scorer 1 (reference on cpu) of machine rank 0 ") and
                                         "step-000001" in e for e in r["errors"]), r["errors"]
    assert "died (exit status 9)" in r["errors"][0]  # rank 0 started it, so it knows the exit status
    assert r["killed_checkpoints"] == ["step-000001"]  # written by the failure path (checkpoint.every_steps=0)
    assert r["resumed_steps"] == [2] and r["resume_weights_equal"] is True and r["resume_metrics_equal"] is True
    assert r["scorer_logs"] == ["machine-0-scorer-0.log", "machine-0-scorer-1.log"]
    # killed in the evaluation after training: both ranks name it and what is on disk; the rerun trains nothing
    assert len(r["eval_errors"]) == 2 and all(
        e and e.startswith("scorer 0 (reward term 0 on cpu) of machine rank 0 ") and "after training" in e and
        "step-000001" in e and "redo only the evaluation" in e for e in r["eval_errors"]), r["eval_errors"]
    assert r["eval_checkpoints"] == ["step-000001"]  # written before the evaluation (checkpoint.every_steps=0)
    assert r["eval_rerun_steps"] == [] and "after" in r["eval_rerun_has_after"]


# ---- the launch traps of docs/ARCHITECTURE.md are refused, not silently run as one process -----------------------
def trap_worker(argv: list[str]) -> None:
    from detoxrl.train.distributed import LaunchError, make_accelerator

    try:
        make_accelerator("auto", 1)
    except LaunchError as err:
        print(f"REFUSED: {err}", flush=True)
        return
    print("NOT REFUSED", flush=True)


@pytest.mark.distributed
def test_silent_single_process_launches_are_refused():
    accelerate = str(Path(sys.executable).parent / "accelerate")
    worker = [str(Path(__file__).resolve()), "trap"]
    base = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # --multi_gpu on a machine without GPUs and without ACCELERATE_USE_CPU: accelerate would run 2 copies of rank 0
    plain = run_bounded([accelerate, "launch", "--multi_gpu", *base, "--main_process_port", str(free_port()),
                         *worker], child_env(), 180)
    assert plain.stdout.count("REFUSED: launched with WORLD_SIZE=2") == 2, plain.stdout[-3000:]
    # DeepSpeed with ACCELERATE_USE_CPU: accelerate would quietly drop DeepSpeed
    ds = run_bounded([accelerate, "launch", "--use_deepspeed", "--zero_stage", "2", *base, "--main_process_port",
                      str(free_port()), *worker], child_env(ACCELERATE_USE_CPU="1"), 180)
    assert ds.stdout.count("REFUSED: DeepSpeed was requested") == 2, ds.stdout[-3000:]


# ---- single-process checks of the GPU-only options (they run everywhere) ------------------------------------------
def test_quantization_is_refused_without_a_gpu():
    from detoxrl.train.config import ConfigError, load_config
    from detoxrl.train.models import bitsandbytes_config

    with pytest.raises(ConfigError, match="policy.quantization: bitsandbytes 8/4-bit weights need a GPU"):
        load_config(None, ["policy.quantization=4bit", "run.device=cpu"])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bitsandbytes_config("8bit", torch.bfloat16, torch.device("cpu"))


def _plugin_accelerator(ds_config: dict, processes: int):
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config)),
                           num_processes=processes)


def test_deepspeed_auto_values_come_from_the_run_config():
    from detoxrl.train.distributed import fill_deepspeed_config

    ds = fill_deepspeed_config(_plugin_accelerator(json.loads(ZERO3_JSON.read_text()), 4), 8, 2, None, 64)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (4, 2, 32, 0.0)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    contradicting = {**json.loads(ZERO3_JSON.read_text()), "gradient_accumulation_steps": 4}
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 in the DeepSpeed config, but the run needs 2"):
        fill_deepspeed_config(_plugin_accelerator(contradicting, 2), 8, 2, 1.0, 64)
    with_scheduler = {**json.loads(ZERO3_JSON.read_text()), "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(ValueError, match="steps its own learning-rate schedule"):
        fill_deepspeed_config(_plugin_accelerator(with_scheduler, 2), 8, 2, 1.0, 64)


def test_auto_dtype_follows_the_launch_precision():
    from detoxrl.train.models import resolve_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu, "bf16") == torch.float32
    assert resolve_dtype("auto", gpu, "fp16") == torch.float16
    assert resolve_dtype("auto", gpu, "bf16") == torch.bfloat16
    assert resolve_dtype("float32", gpu, "bf16") == torch.float32


# ---- GPU-only paths ----------------------------------------------------------------------------------------------
def gpu_run(strategy: str, out: Path, assets: dict[str, Path], overrides: list[str], processes: int = 1,
            mixed_precision: str = "bf16") -> dict:
    argv = [sys.executable, "-m", "detoxrl.launch", "--strategy", strategy, "--num-processes", str(processes),
            "--mixed-precision", mixed_precision, "--main-port", str(free_port()), "--run", "--config",
            str(DEMO_RECIPE), *demo_overrides(assets), "run.device=auto", "run.total_steps=2", "ppo.batch_size=8",
            "logging.progress_bar=false", "evaluation.before_after=false", *overrides, f"run.output_dir={out}"]
    result = run_bounded(argv, child_env(), STRATEGY_TIMEOUT)
    assert result.returncode == 0, result.stdout[-6000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["ppo/loss/total"] is not None for m in metrics)
    return json.loads((out / "run_info.json").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("strategy, mixed_precision", [("single_gpu", "bf16"), ("zero2", "bf16"), ("zero3", "bf16"),
                                                       ("zero2", "fp16")])
def test_mixed_precision_on_one_gpu(demo_assets, tmp_path, strategy, mixed_precision):
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    info = gpu_run(strategy, tmp_path, demo_assets, [], mixed_precision=mixed_precision)
    assert info["mixed_precision"] == mixed_precision and info["devices"]["policy"] == "cuda:0"
    assert info["policy_dtype"] == {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[mixed_precision]
    if strategy != "single_gpu":
        assert info["deepspeed"][mixed_precision] is True


@pytest.mark.gpu
def test_reward_and_reference_on_a_dedicated_gpu(demo_assets, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    info = gpu_run("single_gpu", tmp_path, demo_assets, ["reference.mode=copy"])
    assert info["devices"]["reward"] == {str(demo_assets["reward"]): "cuda:1"}
    assert info["devices"]["reference"] == "cuda:1" and info["reference_dtype"] == info["policy_dtype"]


@pytest.mark.gpu
def test_reward_and_reference_on_the_cpu_next_to_a_gpu_policy(demo_assets, tmp_path):
    info = gpu_run("single_gpu", tmp_path, demo_assets, ["reference.mode=copy", "reference.device=cpu",
                                                          "reward.terms.0.device=cpu"])
    assert info["devices"]["reward"] == {str(demo_assets["reward"]): "cpu"} and info["devices"]["reference"] == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_base_weights(demo_assets, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    info = gpu_run("single_gpu", tmp_path, demo_assets, [f"policy.quantization={bits}", "reference.mode=copy"])
    assert info["quantization"] == bits


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    {"equivalence": equivalence_worker, "trap": trap_worker, "combos": combos_worker}[mode](rest)
