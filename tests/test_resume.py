"""Exact resume: 2N steps == N steps + resume for N more (bitwise weights, identical metrics, continuous TensorBoard
curves) on 1 process, 2-process DDP and (when DeepSpeed support is present) ZeRO-2/3; resume on another number of
processes; corrupt/incomplete checkpoints skipped; the config-change refusal; kill -9 at random moments; the adapter
critic across its warm-up. (Every estimator and critic mode resumes bitwise on 2 processes in test_distributed.py.)"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detoxrl.train import checkpoint as ckpt
from detoxrl.train.config import load_config
from detoxrl.train.loop import train

from conftest import REPO
from test_train import RECIPES, recipe_overrides

RECIPE = "flan_t5_cola_neutral"
# Exercises every piece of resumable state: adaptive KL, running reward moments + clipping, epoch boundaries of the
# prompt order (40 prompts, 8 per step and rank), a max_new_tokens range drawn per step, several PPO epochs.
COMMON = ["run.cpu_threads=1", "logging.progress_bar=false", "run.device=cpu", "evaluation.num_samples=4",
          "optim.lr=0.01", "reward.normalize=true", "reward.clip=3", "ppo.ppo_epochs=2", "logging.sample_every=1"]
WALL_CLOCK = ("time/", "perf/")  # metrics that measure time, not maths


def overrides(models, out: Path, steps: int, *extra: str) -> list[str]:
    return [*recipe_overrides(RECIPE, models), *COMMON, f"run.output_dir={out}", f"run.total_steps={steps}", *extra]


def run_inproc(models, out: Path, steps: int, *extra: str):
    return train(load_config(RECIPES / f"{RECIPE}.yaml", overrides(models, out, steps, *extra)))


def weights(out: Path, where: str = "final") -> dict[str, torch.Tensor]:
    folder = out / where
    return {**load_file(str(folder / "adapter_model.safetensors")),
            **{f"v_head.{k}": v for k, v in load_file(str(folder / "value_head.safetensors")).items()}}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's lines (a last line still being written, or cut by a kill, is left out)."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]


def assert_same_metrics(a: list[dict], b: list[dict], exact: bool = True) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(WALL_CLOCK)}
        assert keys == {k for k in y if not k.startswith(WALL_CLOCK)}
        if exact:
            diff = {k: (x[k], y[k]) for k in keys if x[k] != y[k]}
            assert not diff, f"step {x['step']}: {diff}"
        else:
            for k in keys:
                assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-5), (x["step"], k)


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith(WALL_CLOCK)}


class LogRecords(logging.Handler):
    """Collects detoxrl's log messages (its logger does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "LogRecords":
        logging.getLogger("detoxrl").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("detoxrl").removeHandler(self)


# ----------------------------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(test_models, tmp_path_factory) -> Path:
    """The uninterrupted 6-step run (constant learning rate) the resumed runs are compared with."""
    out = tmp_path_factory.mktemp("straight")
    run_inproc(test_models, out, 6, "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    return out


def test_one_process_resume_is_bitwise_exact_and_tensorboard_continues(test_models, straight, tmp_path):
    run_inproc(test_models, tmp_path, 3, "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    run_inproc(test_models, tmp_path, 6, "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    assert_same_weights(weights(straight), weights(tmp_path))
    assert_same_weights(weights(straight, "checkpoints/step-000006"), weights(tmp_path, "checkpoints/step-000006"))
    assert_same_metrics(metrics(straight), metrics(tmp_path))            # metrics.jsonl has each step once
    assert (tmp_path / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()  # samples too
    assert tensorboard_scalars(tmp_path) == tensorboard_scalars(straight)  # same curves, no duplicated step
    state = json.loads((tmp_path / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert {"step", "samples_seen", "sampler", "kl_controller", "reward_moments", "config", "config_hash",
            "packages", "world_size"} <= set(state)
    assert state["sampler"]["epoch"] >= 1 and state["reward_moments"]["count"] > 0


def test_tensorboard_drops_steps_logged_after_the_checkpoint(test_models, straight, tmp_path):
    """A run killed after logging steps 3-4 but before checkpointing them: the resumed run re-logs them once."""
    run_inproc(test_models, tmp_path, 4, "checkpoint.every_steps=2")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")            # as if killed before that checkpoint
    run_inproc(test_models, tmp_path, 6, "checkpoint.every_steps=2")
    scalars = tensorboard_scalars(tmp_path)
    assert [s for s, _ in scalars["objective/kl"]] == [1, 2, 3, 4, 5, 6]
    assert scalars == tensorboard_scalars(straight)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    steps = [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and steps == sorted(steps)   # each step's rows once, in order
    assert (tmp_path / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


def test_corrupt_or_incomplete_checkpoints_are_skipped(test_models, straight, tmp_path):
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    root = tmp_path / "checkpoints"
    assert ckpt.find_resume_checkpoint(root, "auto", True).name == "step-000006"
    (root / "step-000006" / "COMPLETE").unlink()                          # incomplete: no marker
    truncated = root / "step-000004" / "adapter_model.safetensors"       # corrupt: truncated tensor file
    truncated.write_bytes(truncated.read_bytes()[:1000])
    optim = root / "step-000002" / "optimizer.pt"                        # corrupt: truncated optimizer state
    optim.write_bytes(optim.read_bytes()[:-10])
    with LogRecords() as logs:
        assert ckpt.find_resume_checkpoint(root, "auto", True) is None
    assert any("step-000006" in m and "missing COMPLETE" in m for m in logs.messages), logs.messages
    assert any("step-000004" in m and "adapter_model.safetensors" in m for m in logs.messages), logs.messages
    assert any("step-000002" in m and "optimizer.pt" in m for m in logs.messages), logs.messages

    # end to end: the newest good checkpoint is used, leftovers are cleaned up, the run ends where the straight one did
    shutil.rmtree(root)
    shutil.copytree(straight / "checkpoints", root)
    (root / "step-000006" / "COMPLETE").unlink()
    truncated.write_bytes(truncated.read_bytes()[:1000])
    for bad in ("step-000005.tmp", "step-000001.old"):                    # leftovers of kills mid-write/mid-prune
        shutil.copytree(straight / "checkpoints" / "step-000002", root / bad)
    (root / "step-000005.tmp" / "COMPLETE").unlink()
    with LogRecords() as logs:
        result = run_inproc(test_models, tmp_path, 6, "checkpoint.every_steps=2")
    assert any("skipping checkpoint" in m and "step-000006" in m for m in logs.messages), logs.messages
    assert any("skipping checkpoint" in m and "step-000004" in m for m in logs.messages), logs.messages
    assert any("removing incomplete checkpoint" in m and "step-000005.tmp" in m for m in logs.messages)
    assert not (root / "step-000005.tmp").exists() and not (root / "step-000001.old").exists()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert Path(info["resumed_from"]).name == "step-000002" and result.steps_done == 6
    assert_same_weights(weights(straight), weights(tmp_path))
    assert_same_metrics(metrics(straight)[2:], metrics(tmp_path))       # steps 3..6


def test_killed_between_complete_marker_and_rename_is_recovered(test_models, straight, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-000002", root / "step-000002")
    shutil.copytree(straight / "checkpoints" / "step-000004", root / "step-000004.tmp")  # complete, not renamed
    shutil.copytree(straight / "checkpoints" / "step-000006", root / "step-000006.old")  # being replaced
    assert ckpt.find_resume_checkpoint(root, "auto", True) == root / "step-000004"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


def test_config_change_is_refused_naming_the_keys_unless_harmless(test_models, straight, tmp_path):
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"ppo\.batch_size, reward\.terms\.1\.weight") as err:
        run_inproc(test_models, tmp_path, 8, "ppo.batch_size=4", "reward.terms.1.weight=2.0")
    assert "checkpoint.allow_config_change=true" in str(err.value)
    # total steps, logging, checkpoint interval and devices are harmless
    result = run_inproc(test_models, tmp_path, 7, "logging.log_every=2", "checkpoint.every_steps=3",
                        "checkpoint.keep_last=1", "reward.terms.0.batch_size=7")
    assert result.steps_done == 7 and len(result.metrics) == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]
    # forcing a real change is possible
    shutil.rmtree(tmp_path / "checkpoints")
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    result = run_inproc(test_models, tmp_path, 7, "optim.lr=0.001", "checkpoint.allow_config_change=true")
    assert result.steps_done == 7


def test_nothing_to_do_keeps_the_last_checkpoint(test_models, straight, tmp_path):
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    before = (tmp_path / "checkpoints" / "step-000006" / "COMPLETE").stat().st_mtime_ns
    result = run_inproc(test_models, tmp_path, 6, "checkpoint.every_steps=2")
    assert result.steps_done == 6 and result.metrics == []
    assert (tmp_path / "checkpoints" / "step-000006" / "COMPLETE").stat().st_mtime_ns == before
    assert_same_weights(weights(straight), weights(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# Two processes: DDP, ZeRO-2, ZeRO-3 (the latter two once DeepSpeed checkpoints are supported)
# ----------------------------------------------------------------------------------------------------------------
def deepspeed_missing(strategy: str) -> str | None:
    """Why the ZeRO case cannot run here (None when it can)."""
    if strategy == "ddp":
        return None
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken build
        return f"{strategy}: DeepSpeed is not importable ({type(err).__name__}: {err})"
    if not (REPO / "configs" / "accelerate" / f"{strategy}.yaml").is_file():
        return f"{strategy}: configs/accelerate/{strategy}.yaml is missing (issue 3)"
    if "deepspeed" not in (REPO / "train" / "checkpoint.py").read_text().lower():
        return f"{strategy}: train/checkpoint.py does not save DeepSpeed engine state yet (issue 3)"
    return None


def launch(strategy: str, models, out: Path, steps: int, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU processes (DDP on gloo with the flags of docs/ARCHITECTURE.md, or DeepSpeed
    ZeRO)."""
    bin_dir = Path(sys.executable).parent
    flags = ["--multi_gpu"] if strategy == "ddp" else ["--config_file", str(REPO / "configs" / "accelerate" /
                                                                            f"{strategy}.yaml")]
    cmd = [str(bin_dir / "accelerate"), "launch", *flags, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "detoxrl.train", "--config", str(RECIPES / f"{RECIPE}.yaml"), *overrides(models, out, steps, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if strategy == "ddp":  # DeepSpeed on a CPU-only machine must be launched without it (train/distributed.py)
        env["ACCELERATE_USE_CPU"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(test_models, tmp_path_factory):
    """Per strategy: (4 steps in one go, the same resumed from its step-2 checkpoint, a copy of that checkpoint)."""
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(strategy: str) -> tuple[Path, Path, Path]:
        if strategy not in cache:
            straight = tmp_path_factory.mktemp(f"{strategy}_straight")
            launch(strategy, test_models, straight, 4, "checkpoint.every_steps=2", "checkpoint.keep_last=2")
            half = tmp_path_factory.mktemp(f"{strategy}_half")    # as if the run had ended after step 2
            shutil.copytree(straight, half, dirs_exist_ok=True)
            shutil.rmtree(half / "checkpoints" / "step-000004")
            shutil.rmtree(half / "final")
            resumed = tmp_path_factory.mktemp(strategy)
            shutil.copytree(half, resumed, dirs_exist_ok=True)
            out = launch(strategy, test_models, resumed, 4, "checkpoint.every_steps=2", "checkpoint.keep_last=2")
            assert "resumed from" in out.stderr and "at step 2" in out.stderr
            cache[strategy] = (straight, resumed, half)
        return cache[strategy]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_process_resume_is_exact(strategy, two_process_runs):
    reason = deepspeed_missing(strategy)
    if reason:
        pytest.skip(reason)
    straight, resumed, _ = two_process_runs(strategy)
    info = json.loads((resumed / "run_info.json").read_text())
    assert info["world_size"] == 2
    exact = strategy != "zero3"  # ZeRO-3 partitions reductions differently: fp32 tolerance only
    assert_same_weights(weights(straight), weights(resumed), exact=exact)
    assert_same_metrics(metrics(straight), metrics(resumed), exact=exact)
    assert sorted(p.name for p in (resumed / "checkpoints" / "step-000004" / "rng").iterdir()) == [
        "rank-00000.pt", "rank-00001.pt"]


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_number_of_processes_works_and_says_it_is_not_exact(test_models, two_process_runs):
    _, _, half = two_process_runs("ddp")                                  # checkpoint at step 2 written by 2 ranks
    with LogRecords() as logs:
        result = run_inproc(test_models, half, 4, "checkpoint.every_steps=2")
    assert result.steps_done == 4 and [m["step"] for m in result.metrics] == [3, 4]
    assert any("no longer bit-exact" in m and "1 process(es)" in m and "written by 2" in m for m in logs.messages), \
        logs.messages
    assert json.loads((half / "run_info.json").read_text())["world_size"] == 1


# ----------------------------------------------------------------------------------------------------------------
# kill -9 at random moments, including while a checkpoint is being written
# ----------------------------------------------------------------------------------------------------------------
KILL_STEPS = 5


@pytest.mark.slow
def test_kill_minus_9_anywhere_loses_only_steps_since_the_last_checkpoint(test_models, tmp_path):
    extra = ("checkpoint.every_steps=1", "checkpoint.keep_last=2", "ppo.ppo_epochs=1")
    reference = tmp_path / "reference"
    run_inproc(test_models, reference, KILL_STEPS, *extra)
    cmd = [sys.executable, "-m", "detoxrl.train", "--config", str(RECIPES / f"{RECIPE}.yaml")]
    # the test hook sleeps inside save_checkpoint, between the adapter and the optimizer: a wide window to land in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETOXRL_TEST_CHECKPOINT_DELAY": "0.5"}
    kills = []
    for seed in range(2):  # 4 kills: 2 while a checkpoint is written, 2 at random moments
        rng = random.Random(seed)
        out = tmp_path / f"seed{seed}"
        args = overrides(test_models, out, KILL_STEPS, *extra)
        for attempt in range(2):
            started = time.time()
            log_file = tmp_path / f"seed{seed}-{attempt}.log"
            with log_file.open("w") as log:  # (a pipe nobody reads could fill up and stall the run)
                proc = subprocess.Popen([*cmd, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
            mode = ["mid_checkpoint", "random"][(seed + attempt) % 2]
            deadline = time.monotonic() + 120

            def waiting(cond) -> bool:
                return not cond() and proc.poll() is None and time.monotonic() < deadline

            if mode == "mid_checkpoint":   # while the checkpoint of a random step is being written
                target = rng.randint(1, KILL_STEPS - 1)
                while waiting(lambda: any(int(p.name[5:11]) >= target for p in out.glob("checkpoints/step-*.tmp"))):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.4))
            else:                          # at a random moment once this process is training
                metrics_file = out / "metrics.jsonl"
                while waiting(lambda: metrics_file.exists() and metrics_file.stat().st_mtime > started):
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed ({proc.returncode}): "
                            f"{log_file.read_text()[-3000:]}")
            proc.kill()
            proc.wait()
            logged = [m["step"] for m in metrics(out)] if (out / "metrics.jsonl").exists() else []
            newest = ckpt.find_resume_checkpoint(out / "checkpoints", "auto", True)
            kills.append((seed, mode, logged[-1] if logged else 0, newest.name if newest else None))
            # at most the steps since the newest complete checkpoint are lost (every step is checkpointed here)
            assert (int(newest.name[5:]) if newest else 0) >= (logged[-1] if logged else 0) - 1, kills
        done = subprocess.run([*cmd, *args], env={**env, "DETOXRL_TEST_CHECKPOINT_DELAY": "0"}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_weights(weights(reference), weights(out))
        assert [m["step"] for m in metrics(out)] == list(range(1, KILL_STEPS + 1))
        assert tensorboard_scalars(out) == tensorboard_scalars(reference)
    print("kills (seed, mode, last step logged, checkpoint resumed from):", kills)
    assert any(mode == "mid_checkpoint" for _, mode, _, _ in kills)


# ----------------------------------------------------------------------------------------------------------------
# The critic adapter (issue 9): its own PEFT folder in every checkpoint, its own parameter group, a warm-up
# ----------------------------------------------------------------------------------------------------------------
def test_adapter_critic_resumes_bitwise_across_its_warm_up(test_models, tmp_path):
    """critic.mode=adapter with its own learning rate and a 2-step warm-up: 2 steps + resume 1 == 3 steps bitwise
    (policy adapter, critic adapter, value head, metrics); the critic adapter is a PEFT folder that loads."""
    extra = ("critic.mode=adapter", "critic.lr=0.02", "critic.warmup_steps=2", "critic.lam=1.0",
             "checkpoint.every_steps=1", "checkpoint.keep_last=3", "ppo.ppo_epochs=1", "logging.sample_every=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inproc(test_models, straight, 3, *extra)
    run_inproc(test_models, resumed, 2, *extra)
    run_inproc(test_models, resumed, 3, *extra)

    def everything(out: Path, where: str) -> dict[str, torch.Tensor]:
        return {**weights(out, where), **{f"critic.{k}": v for k, v in
                                          load_file(str(out / where / "critic" / "adapter_model.safetensors")).items()}}

    assert_same_weights(everything(straight, "final"), everything(resumed, "final"))
    assert_same_metrics(metrics(straight), metrics(resumed))
    # the warm-up held the policy still (LoRA B starts at 0) while the critic adapter trained; then the policy moved
    step = {s: everything(straight, f"checkpoints/step-00000{s}") for s in (1, 2, 3)}
    for s in (1, 2):
        assert all(v.abs().max() == 0 for k, v in step[s].items() if "lora_B" in k and not k.startswith("critic."))
        assert any(v.abs().max() > 0 for k, v in step[s].items() if "lora_B" in k and k.startswith("critic."))
    assert any(v.abs().max() > 0 for k, v in step[3].items() if "lora_B" in k and not k.startswith("critic."))
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM
    critic = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(test_models["t5"]),
                                       str(straight / "final" / "critic"))
    policy_r = json.loads((straight / "final" / "adapter_config.json").read_text())["r"]
    assert critic.peft_config["default"].r == policy_r                    # critic.lora null: policy.lora's settings
    got = {k: v for k, v in critic.state_dict().items() if "lora_B" in k}
    want = {k: v for k, v in step[3].items() if k.startswith("critic.") and "lora_B" in k}
    assert len(got) == len(want) > 0 and any(v.abs().max() > 0 for v in got.values())
