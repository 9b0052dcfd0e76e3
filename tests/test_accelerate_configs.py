"""The shipped accelerate configs, launched exactly as the documentation tells users to type them.

Each file under configs/accelerate states its commands in its header (`#   GPU: ...` and `#   CPU: ...`), and the
README shows some of them. The CPU command of EVERY file is run with plain `accelerate launch` and must record the
expected world size and ZeRO stage in run_info.json: ddp, zero2, zero3 and zero3_offload by tests/test_distributed.py
(2 processes, with its lock-step, equivalence and resume checks), single_gpu and multi_node here (the multi-node file
as two machines on this host, rendezvousing over loopback, each machine with its own scorer processes; `slow`: that
run and the same under DDP equal one machine of the same world size, bitwise). The GPU commands are parsed with accelerate's own
command-line parser (they cannot run here) and must differ from the CPU ones only in precision and process count; a
GPU command typed on a CPU-only machine is refused in one line. The README's commands must be ones a header
documents, so documentation and tests cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from documented import ACCELERATE_DIR, REPO, cpu_launch, documented_commands, split_command
from test_distributed import child_env, free_port, run_bounded

CONFIG_FILES = sorted(ACCELERATE_DIR.glob("*.yaml"))
DEMO_RECIPE = "configs/ppo/demo.yaml"
# 2 short steps of the demo; every rank writes its own output only where the trainer says so
RUN_OVERRIDES = ["run.total_steps=2", "run.cpu_threads=1", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                 "generation.max_new_tokens=8", "evaluation.before_after=false", "logging.progress_bar=false",
                 "logging.sample_every=0", "checkpoint.every_steps=0"]
# Fields accelerate refuses in a config file next to `deepspeed_config_file` ("... will be ignored"), from
# accelerate's DeepSpeedPlugin._deepspeed_config_checks; `mixed_precision` counts when it comes from the file.
DEEPSPEED_FILE_CONFLICTS = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                            "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                            "zero3_save_16bit_model", "mixed_precision"}
def accelerate_args(args: list[str]):
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_args(args)


def readme_commands() -> list[str]:
    """Every `accelerate launch --config_file ...` command in the README, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [re.sub(r"\s+", " ", m.group(0)).strip()
            for m in re.finditer(r"^(?:[A-Z_]+=\S+ )*accelerate launch --config_file [^\n#]+", text, re.M)]


def expected_layout(path: Path) -> tuple[int, int | None, str]:
    """(world size, ZeRO stage, distributed type) the CPU command of a file must produce."""
    cfg = yaml.safe_load(path.read_text())
    ds_file = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
    stage = json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"] if ds_file else None
    if ds_file:
        return 2, stage, "DEEPSPEED"
    return (1, None, "NO") if cfg["distributed_type"] == "NO" else (2, None, "MULTI_CPU")


# ---- the documentation itself ------------------------------------------------------------------------------------
def test_every_config_documents_a_gpu_and_a_cpu_command():
    assert {p.name for p in CONFIG_FILES} == {"single_gpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml",
                                             "zero3_offload.yaml", "multi_node.yaml"}
    for path in CONFIG_FILES:
        commands = documented_commands(path)
        assert set(commands) == {"GPU", "CPU"}, f"{path.name}: header must show a GPU: and a CPU: command"
        parsed = {}
        for where, command in commands.items():
            env, args = split_command(command)
            a = accelerate_args([{"$NODE_RANK": "0", "$MASTER_ADDR": "127.0.0.1"}.get(x, x) for x in args])
            assert Path(a.config_file) == path.relative_to(REPO), command
            assert a.module and a.training_script == "detoxrl.train", command
            assert a.training_script_args == ["--config", "RECIPE"], command
            parsed[where] = (env, a)
        (gpu_env, gpu), (cpu_env, cpu) = parsed["GPU"], parsed["CPU"]
        assert gpu.mixed_precision == "bf16" and cpu.mixed_precision is None, path.name
        assert gpu_env == {} and set(cpu_env) <= {"ACCELERATE_USE_CPU"}, path.name
        # apart from precision and the process count, the GPU and CPU commands are the same command
        same = ("num_machines", "machine_rank", "main_process_ip", "main_process_port", "deepspeed_config_file")
        assert all(getattr(gpu, k) == getattr(cpu, k) for k in same), path.name


def test_no_shipped_config_can_reach_the_will_be_ignored_error():
    """accelerate refuses a DeepSpeed JSON next to accelerate-side DeepSpeed fields (or a `mixed_precision` from the
    file); precision belongs to the JSON's bf16/fp16 sections ("auto", filled from --mixed_precision)."""
    for path in CONFIG_FILES:
        cfg = yaml.safe_load(path.read_text())
        ds = cfg.get("deepspeed_config") or {}
        if "deepspeed_config_file" not in ds:
            continue
        fields = set(ds) | ({"mixed_precision"} if cfg.get("mixed_precision") is not None else set())
        assert not fields & DEEPSPEED_FILE_CONFLICTS, f"{path.name}: {sorted(fields & DEEPSPEED_FILE_CONFLICTS)}"
        ds_json = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
        assert ds_json["bf16"]["enabled"] == "auto" and ds_json["fp16"]["enabled"] == "auto", path.name


def test_readme_commands_are_the_documented_ones():
    documented = {c for p in CONFIG_FILES for c in documented_commands(p).values()}
    found = readme_commands()
    assert len(found) >= 3, found  # the GPU and CPU forms of the direct launch, and the multi-node command
    for command in found:
        normalised = re.sub(r"--config \S+", "--config RECIPE", command)
        normalised = re.sub(r" run\.output_dir=\S+", "", normalised)
        assert normalised in documented, f"README command is not one a config header documents: {command}"


# ---- the CPU commands, run (ddp and the ZeRO files: tests/test_distributed.py) ----------------------------------
def run_documented(strategy: str, out: Path, port: int, replace: dict[str, str] | None = None,
                   extra: tuple[str, ...] = ()) -> subprocess.Popen:
    argv, env = cpu_launch(strategy, str(Path(sys.executable).parent / "accelerate"), REPO / DEMO_RECIPE, port,
                           replace=replace)
    return subprocess.Popen([*argv, *RUN_OVERRIDES, *extra, f"run.output_dir={out}"], env=child_env(**env), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    """Outputs of the launches; kills every process group on a timeout or an error, so nothing is left running."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-6000:]
        assert "will be ignored" not in text
    return outputs


def check_run(out: Path, path: Path) -> dict:
    world, stage, dist = expected_layout(path)
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (world, stage, dist), path.name
    assert info["mixed_precision"] == "no" and len(info["devices_by_rank"]) == world
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    return info


def test_every_multi_process_file_is_run_by_the_distributed_tests():
    """ddp and the ZeRO files are launched by tests/test_distributed.py through cpu_launch; the others here."""
    import test_distributed

    source = Path(test_distributed.__file__).read_text()
    for name in ("ddp", "zero2", "zero3", "zero3_offload"):
        assert f'("{name}", ' in source, name
    assert "cpu_launch(strategy" in source


@pytest.mark.distributed
def test_documented_single_gpu_command_trains(demo_assets, tmp_path):
    finish([run_documented("single_gpu", tmp_path / "run", free_port())])
    check_run(tmp_path / "run", ACCELERATE_DIR / "single_gpu.yaml")


# each machine runs its own reward scorer and reference scorer; per_rank batching keeps the scores bitwise those of
# local scoring, so the run must equal one machine of the same world size
SCORERS = ("reward.placement=scorer", "reference.mode=copy", "reference.device=cpu", "reference.placement=scorer",
           "scorer.batching=per_rank")


@pytest.fixture(scope="module")
def two_machines(demo_assets, tmp_path_factory) -> Path:
    """Two launches on this host, machine ranks 0 and 1 of 1 process each, rendezvousing over loopback (ZeRO-2),
    each machine with its own scorers."""
    out, port = tmp_path_factory.mktemp("two_machines") / "run", str(free_port())
    finish([run_documented("multi_node", out, 0, {"$NODE_RANK": rank, "$MASTER_ADDR": "127.0.0.1", "29500": port},
                           extra=SCORERS) for rank in ("0", "1")])
    return out


@pytest.mark.distributed
def test_documented_multi_node_command_trains_as_two_machines(two_machines):
    info = check_run(two_machines, ACCELERATE_DIR / "multi_node.yaml")
    assert info["num_machines"] == 2 and info["local_world_size"] == 1
    assert [(s["machine"], s["scorer"], len(s["models"])) for s in info["scorers"]] == [(0, 0, 1), (0, 1, 1),
                                                                                      (1, 0, 1), (1, 1, 1)]
    assert sorted(p.name for p in (two_machines / "scorers").iterdir()) == [
        f"machine-{m}-scorer-{k}.log" for m in (0, 1) for k in (0, 1)]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final adapter and every metric but timings."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    timeless = [[{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "perf/"))}
                 for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert timeless[0] == timeless[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_machines_with_scorers_equal_one_machine_of_the_same_world_size(two_machines, tmp_path):
    """The same run as one machine of 2 processes (ZeRO-2, one set of scorers serving both ranks): bitwise equal."""
    finish([run_documented("zero2", tmp_path / "run", free_port(), extra=SCORERS)])  # its CPU command: 2 processes
    one = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert one["num_machines"] == 1 and one["world_size"] == 2 and len(one["scorers"]) == 2
    assert_same_run(two_machines, tmp_path / "run")


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_two_machines_with_scorers_equals_one_machine(demo_assets, tmp_path):
    """DDP (gloo), two machines of 1 process on this host, each with its own scorers == one machine of 2."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    common = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = ["-m", "detoxrl.train", "--config", str(REPO / DEMO_RECIPE), *RUN_OVERRIDES, *SCORERS]
    env, port = child_env(ACCELERATE_USE_CPU="1"), str(free_port())

    def start(argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    finish([start([accelerate, "launch", *common, "--num_machines", "2", "--machine_rank", rank,
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, *run,
                   f"run.output_dir={tmp_path / 'two'}"]) for rank in ("0", "1")])
    finish([start([accelerate, "launch", *common, "--num_machines", "1", "--main_process_port", str(free_port()),
                   *run, f"run.output_dir={tmp_path / 'one'}"])])
    two = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert (two["distributed_type"], two["num_machines"]) == ("MULTI_CPU", 2)
    assert [(s["machine"], s["scorer"]) for s in two["scorers"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_same_run(tmp_path / "two", tmp_path / "one")


@pytest.mark.distributed
def test_a_gpu_command_on_the_cpu_is_one_clear_line(demo_assets, tmp_path):
    """A CPU-only user who copies the GPU command (bf16) is stopped on every rank with one line and exit status 2."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the GPU command is the right one")
    env, args = split_command(documented_commands(ACCELERATE_DIR / "zero2.yaml")["GPU"])
    args = [{"8": "2", "RECIPE": str(REPO / DEMO_RECIPE)}.get(a, a) for a in args]
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "--main_process_port", str(free_port()), *args,
            *RUN_OVERRIDES, f"run.output_dir={tmp_path / 'run'}"]
    result = run_bounded(argv, child_env(**env), 300)
    assert result.returncode != 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    line = ("detoxrl-train: launch error: mixed precision bf16 was requested, but this run trains on the CPU, which "
            "detoxrl does in float32: drop --mixed_precision (or pass --mixed_precision no)")
    assert result.stdout.count(line) == 2, result.stdout[-4000:]  # once per rank (their lines may interleave)
    # no traceback from detoxrl's code (what follows the line is the launcher's own report of a failed worker)
    assert not re.search(r'File "[^"]*/(train|launch)/\w+\.py"', result.stdout), result.stdout[-4000:]
