"""`detoxrl-launch`: device plans on made-up machines (including the refusals), the command lines it builds, and the
accelerate / DeepSpeed config files it points to. Pure: no GPU, no process is launched."""

from __future__ import annotations

import json

import pytest
import yaml

from detoxrl.launch.cli import main
from detoxrl.train.devices import place_auxiliary
from detoxrl.launch.plan import (ACCELERATE_CONFIGS, DEEPSPEED_CONFIGS, DEEPSPEED_FILE, STRATEGIES, PlanError,
                                 build_command, environment_defaults, make_plan)

from conftest import REPO

RECIPE = REPO / "configs" / "ppo" / "flan_t5_base_dialogsum_detox.yaml"


# ---- the placement rule (shared with the trainer) ----------------------------------------------------------------
def test_auto_takes_the_gpus_after_the_training_ranks_in_order():
    assert place_auxiliary(["auto", "auto"], n_gpus=8, local_ranks=6, own_device="cuda:2") == ["cuda:6", "cuda:7"]
    # more auto devices than spare GPUs: wrap around
    assert place_auxiliary(["auto", "auto", "auto"], 8, 7, "cuda:0") == ["cuda:7"] * 3
    # named devices are left alone and do not use up a spare GPU
    assert place_auxiliary(["cpu", "auto", "cuda:5"], 8, 6, "cuda:1") == ["cpu", "cuda:6", "cuda:5"]


def test_auto_is_the_ranks_own_device_without_a_spare_gpu():
    assert place_auxiliary(["auto"], 4, 4, "cuda:3") == ["cuda:3"]
    assert place_auxiliary(["auto", "auto"], 0, 2, "cpu") == ["cpu", "cpu"]


# ---- plans -------------------------------------------------------------------------------------------------------
def test_dedicated_gpus_are_set_aside_from_the_training_ranks():
    plan = make_plan("zero2", 8, ["cuda:6"], "copy", "cuda:7")
    assert plan.ranks_per_node == 6 and plan.world_size == 6
    assert plan.rank_devices == [f"cuda:{i}" for i in range(6)]
    assert plan.reward_devices == [["cuda:6"] * 6] and plan.reference_device == ["cuda:7"] * 6
    text = plan.describe()
    assert "rank 5 (local)   trains on cuda:5" in text and "on cuda:6" in text and "on cuda:7" in text


def test_auto_devices_follow_num_processes():
    plan = make_plan("ddp", 8, ["auto", "auto"], "copy", "auto", num_processes=5)
    assert plan.reward_devices == [["cuda:5"] * 5, ["cuda:6"] * 5] and plan.reference_device == ["cuda:7"] * 5
    plan = make_plan("ddp", 4, ["auto"], "shared", "auto")  # every GPU trains: auto shares each rank's own GPU
    assert plan.ranks_per_node == 4 and plan.reward_devices == [["cuda:0", "cuda:1", "cuda:2", "cuda:3"]]
    assert plan.reference_device is None and any("no GPU is left over" in w for w in plan.warnings)


def test_single_gpu_and_cpu_plans():
    plan = make_plan("single_gpu", 2, ["auto"], "copy", "cpu")
    assert plan.world_size == 1 and plan.reward_devices == [["cuda:1"]] and plan.reference_device == ["cpu"]
    plan = make_plan("zero3", 0, ["auto"], "shared", "auto", num_processes=2)
    assert plan.rank_devices == ["cpu", "cpu"] and plan.reward_devices == [["cpu", "cpu"]]


def test_multi_node_plans_every_machine_alike():
    plan = make_plan("multi_node", 8, ["cuda:7"], "shared", "auto", nodes=4)
    assert plan.ranks_per_node == 7 and plan.world_size == 28


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="ddp", n_gpus=8, reward_devices=["cuda:0"]), "is also the GPU of training rank 0"),
    (dict(strategy="ddp", n_gpus=8, reward_devices=["cuda:3"], num_processes=6), "is also the GPU of training rank 3"),
    (dict(strategy="ddp", n_gpus=4, reward_devices=["auto"], num_processes=5), "5 training ranks need 5 GPUs"),
    (dict(strategy="zero2", n_gpus=4, reward_devices=["cuda:3"], num_processes=4), "1 of them dedicated"),
    (dict(strategy="ddp", n_gpus=2, reward_devices=["cuda:0"], reference_mode="copy", reference_device="cuda:1"),
     "no GPU left for training"),
    (dict(strategy="ddp", n_gpus=8, reward_devices=["cuda:8"]), "cuda:8 does not exist"),
    (dict(strategy="ddp", n_gpus=8, reward_devices=["cuda"]), "ambiguous"),
    (dict(strategy="ddp", n_gpus=8, reward_devices=["gpu1"]), "is not a device"),
    (dict(strategy="ddp", n_gpus=0, reward_devices=["cuda:0"]), "no GPU"),
    (dict(strategy="zero3", n_gpus=8, reward_devices=["auto"], quantization="4bit"), "cannot be combined with zero3"),
    (dict(strategy="ddp", n_gpus=0, reward_devices=["auto"], quantization="8bit"), "needs GPUs"),
    (dict(strategy="single_gpu", n_gpus=4, reward_devices=["auto"], num_processes=2), "runs 1 process"),
    (dict(strategy="multi_node", n_gpus=8, reward_devices=["auto"]), "at least 2 machines"),
    (dict(strategy="zero2", n_gpus=8, reward_devices=["auto"], nodes=2), "use multi_node"),
    (dict(strategy="fsdp", n_gpus=8, reward_devices=["auto"]), "unknown strategy"),
])
def test_impossible_plans_are_refused_with_the_reason(kwargs, message):
    args = {"reference_mode": "shared", "reference_device": "auto", **kwargs}
    with pytest.raises(PlanError, match=message):
        make_plan(**args)


# ---- command lines -------------------------------------------------------------------------------------------------
def test_gpu_commands_never_hide_gpus():
    plan = make_plan("zero3", 8, ["cuda:7"], "shared", "auto")
    cmd = build_command(plan, "r.yaml", ["ppo.batch_size=8"], mixed_precision="bf16")
    argv = cmd.argv
    assert argv[:2] == ["accelerate", "launch"] and "--gpu_ids" not in argv
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env
    assert argv[argv.index("--num_processes") + 1] == "7"
    assert argv[argv.index("--config_file") + 1] == str((ACCELERATE_CONFIGS / "zero3.yaml").resolve())
    assert argv[argv.index("--deepspeed_config_file") + 1] == str((DEEPSPEED_CONFIGS / "zero3.json").resolve())
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    assert argv[-5:] == ["-m", "detoxrl.train", "--config", "r.yaml", "ppo.batch_size=8"]
    # precision is always on the command line: the shipped files leave it out (accelerate refuses it in a file next
    # to a DeepSpeed JSON), and bf16 is the GPU default
    default = build_command(plan, None, []).argv
    assert default[default.index("--mixed_precision") + 1] == "bf16"


def test_cpu_commands_avoid_the_single_process_traps():
    ddp = build_command(make_plan("ddp", 0, ["auto"], "shared", "auto", num_processes=2), None, [])
    assert ddp.env == {"ACCELERATE_USE_CPU": "1"} and "--multi_gpu" in ddp.argv
    assert ddp.argv[ddp.argv.index("--mixed_precision") + 1] == "no"
    zero = build_command(make_plan("zero2", 0, ["auto"], "shared", "auto", num_processes=2), None, [])
    assert zero.unset == ["ACCELERATE_USE_CPU"] and "ACCELERATE_USE_CPU" not in zero.env
    assert "--multi_gpu" not in zero.argv and zero.shell().startswith("env -u ACCELERATE_USE_CPU accelerate launch")
    with pytest.raises(PlanError, match="needs GPUs"):
        build_command(make_plan("ddp", 0, ["auto"], "shared", "auto", num_processes=2), None, [],
                      mixed_precision="bf16")


def test_multi_node_command_takes_rank_and_address():
    plan = make_plan("multi_node", 8, ["auto"], "shared", "auto", nodes=2)
    with pytest.raises(PlanError, match="machine's rank"):
        build_command(plan, None, [])
    cmd = build_command(plan, None, [], machine_rank=1, main_address="10.1.2.3")
    a = cmd.argv
    assert a[a.index("--num_processes") + 1] == "16" and a[a.index("--num_machines") + 1] == "2"
    assert a[a.index("--machine_rank") + 1] == "1" and a[a.index("--main_process_ip") + 1] == "10.1.2.3"
    assert a[a.index("--main_process_port") + 1] == "29500"
    with pytest.raises(PlanError, match="outside 0..1"):
        build_command(plan, None, [], machine_rank=2, main_address="h")
    env = environment_defaults({"SLURM_NODEID": "3", "MASTER_ADDR": "n0", "SLURM_NNODES": "4", "MASTER_PORT": "6000"})
    assert env == {"machine_rank": "3", "main_address": "n0", "main_port": "6000", "nodes": "4"}


def test_cli_dry_run_prints_the_plan_and_the_command(capsys):
    assert main(["--strategy", "zero2", "--gpus", "8", "--num-processes", "6", "--config", str(RECIPE),
                 "reference.mode=copy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 training rank(s)" in out and "reference (frozen copy)   on cuda:7" in out
    assert "roberta-hate-speech-dynabench-r4-target (nothate)   on cuda:6" in out
    assert "accelerate launch --config_file" in out and "reference.mode=copy" in out


def test_cli_refuses_with_a_clear_message(capsys):
    assert main(["--strategy", "ddp", "--gpus", "8", "--config", str(RECIPE), "reward.terms.0.device=cuda:0"]) == 2
    assert "impossible plan: reward.terms.0.device=cuda:0 is also the GPU of training rank 0" in capsys.readouterr().err
    assert main(["--strategy", "ddp", "--gpus", "8", "--config", str(RECIPE), "reward.terms.0.devise=cuda:0"]) == 2
    assert "config error" in capsys.readouterr().err


def test_cli_refuses_a_main_address_that_does_not_resolve(capsys, monkeypatch):
    """--run with several machines: an address that does not resolve (a SLURM NodeName that is no hostname) is a
    one-line error before anything starts, not a rendezvous that retries without end."""
    monkeypatch.setattr("detoxrl.launch.cli.subprocess.call", lambda *a, **k: pytest.fail("launched anyway"))
    assert main(["--strategy", "multi_node", "--gpus", "8", "--nodes", "2", "--machine-rank", "1", "--main-address",
                 "no-such-node.invalid", "--config", str(RECIPE), "--run"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-node.invalid' does not resolve here" in err and "--main-address" in err


# ---- the config files the strategies point to -------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_files_exist_and_never_hide_gpus(strategy):
    cfg = yaml.safe_load((ACCELERATE_CONFIGS / f"{strategy}.yaml").read_text())
    assert cfg["gpu_ids"] == "all" and cfg["use_cpu"] is False
    if strategy in DEEPSPEED_FILE:
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert cfg["deepspeed_config"]["zero3_init_flag"] is False  # build whole, let prepare shard
        ds_path = REPO / cfg["deepspeed_config"]["deepspeed_config_file"]
        assert ds_path.name == DEEPSPEED_FILE[strategy]
        ds = json.loads(ds_path.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert ds[key] == "auto", key  # filled from the run config
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW, and a schedule stepped by the loop
        assert ds["zero_optimization"]["stage"] == (3 if strategy.startswith("zero3") else 2)
    if strategy == "zero3_offload":
        zero = ds["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
