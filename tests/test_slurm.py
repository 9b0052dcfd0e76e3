"""The shipped sbatch scripts on a real SLURM cluster (slurmctld + slurmd + munged on this machine).

Installs Debian's `slurm-wlm` and `munge` with apt-get when they are missing (so it needs root and apt), starts the
daemons in the foreground as children of the test (munged as the munge user), and submits with the tiny recipe on CPU:
- one node: `slurm/ppo_single_node.sbatch` twice (2 processes each; the jobs share the node), an uninterrupted
  reference and a run that gets `scancel --signal=USR1 --batch` mid-run. The signalled job must checkpoint, requeue
  itself, resume from that checkpoint, finish its steps and end with the reference's weights.
- two nodes (two slurmd on this host, `slurmd -N node1` / `-N node2`): `slurm/ppo_multi_node.sbatch` (1 process per
  node, each machine with its own reward scorer); the ranks must stay in lock-step and train.
Everything is stopped afterwards and no process of the test may be left.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_resume import free_port

STEPS = 8
SBATCH = REPO / "slurm" / "ppo_single_node.sbatch"


@pytest.mark.parametrize("script", ["ppo_single_node.sbatch", "ppo_multi_node.sbatch"])
def test_sbatch_scripts_requeue_signal_ahead_and_append(script):
    """The options the requeue/resume flow depends on (the multi-node script runs on two nodes below)."""
    path = REPO / "slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    options = [ln.split(None, 1)[1].strip() for ln in path.read_text().splitlines() if ln.startswith("#SBATCH ")]
    assert {"--requeue", "--open-mode=append", "--signal=B:USR1@180", "--ntasks-per-node=1"} <= set(options)
    assert any(o.startswith("--output=") for o in options) and any(o.startswith("--error=") for o in options)
    assert not any(o.startswith(("--partition", "--account", "--gpus")) for o in options)  # site lines: commented
    assert "slurm/detoxrl_job.sh\" batch" in path.read_text()


def _install_slurm() -> None:
    """slurmctld, slurmd, the client commands and munged, from Debian's packages (skip if that is impossible)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root")
    if not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"could not install SLURM ({' '.join(cmd)}): {done.stderr.strip()[-500:]}")


class LocalSlurm:
    """A cluster on localhost, every daemon a child process of the test (so it can be stopped for sure).

    One node is this host under its own name. With `nodes` > 1 there are that many nodes node1..nodeN, all this host
    (NodeHostname) at 127.0.0.1, each with its own slurmd (`slurmd -N nodeK`) on its own port, spool directory, pid
    and log file (`%n`): Debian's slurmd 22.05 runs so, and an `srun -N 2` task sees SLURMD_NODENAME node1 / node2
    and SLURM_NODEID 0 / 1, as on two machines.
    """

    def __init__(self, root: Path, nodes: int = 1) -> None:
        self.root = root
        self.nodes = nodes
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
        if nodes == 1:
            self.node_names = [host]
            node_lines = f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN"
            spool, suffix = "", ""
        else:
            self.node_names = [f"node{k}" for k in range(1, nodes + 1)]
            node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 "
                                   f"RealMemory=2000 State=UNKNOWN" for n in self.node_names)
            spool, suffix = "/%n", "-%n"  # each slurmd its own spool directory, pid file and log
        munge_dir = root / "munge"
        munge_dir.mkdir()
        (munge_dir / "munge.key").write_bytes(os.urandom(1024))
        shutil.chown(munge_dir, "munge", "munge")
        shutil.chown(munge_dir / "munge.key", "munge", "munge")
        munge_dir.chmod(0o711)  # munged: the socket's directory must be searchable by all, writable by none
        (munge_dir / "munge.key").chmod(0o600)
        self.munge_socket = munge_dir / "munge.socket"
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text(f"""\
ClusterName=detoxrltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job starts again after ~11 s instead of ~2 min
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{spool}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{suffix}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{suffix}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# memory per CPU so that two jobs can share the node
DefMemPerCPU=500
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60; backfill's 30): the requeued job starts once eligible, ~11 s later
SchedulerParameters=sched_interval=2
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env.pop("SLURM_JOB_ID", None)

    def _start(self, cmd: list[str], name: str = "", **kwargs) -> None:
        log = open(self.root / "log" / f"{name or Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, **kwargs))

    def start(self) -> None:
        m = self.root / "munge"
        self._start(["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                    user="munge", group="munge", extra_groups=[])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged to create its socket")
        self._start(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        if self.nodes == 1:
            self._start(["slurmd", "-D", "-f", str(self.conf)])
        else:
            for n in self.node_names:
                self._start(["slurmd", "-D", "-N", n, "-f", str(self.conf)], name=f"slurmd-{n}")
        self._wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split().count("idle")
                   == self.nodes, 30, f"{self.nodes} idle node(s)")

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}\n{self.logs()}")
            if time.monotonic() > end:
                raise TimeoutError(f"waited {timeout} s for {what}\n{self.logs()}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, check=check, timeout=30)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        """Cancel every job, wait until none is left, then stop the daemons (slurmd, slurmctld, munged)."""
        try:
            self.run("scancel", "--full", "-u", "root", check=False)
            end = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < end:
                time.sleep(0.5)
        except Exception:
            pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _processes() -> dict[int, str]:
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd:  # zombies have none
                found[int(d.name)] = cmd
    return found


def _left_behind(before: dict[int, str], *paths: Path) -> list[str]:
    """Processes of this test still alive: any mentioning its folders, and SLURM/munge processes started since."""
    return [f"{pid}: {cmd[:200]}" for pid, cmd in _processes().items()
            if any(str(p) in cmd for p in paths)
            or (pid not in before and cmd.split()[0].split("/")[-1].rstrip(":") in ("slurmstepd", "slurmd",
                                                                                       "slurmctld", "munged", "srun"))]


def _tiny_overrides(m: dict[str, Path], out: Path) -> list[str]:
    return [f"policy.model={m['t5']}", f"reward.terms.0.model={m['roberta_cola']}",
            f"reward.terms.1.model={m['roberta_sentiment']}", f"data.dataset={m['dialogsum']}",
            "data.min_text_chars=0", "data.max_samples=40", "ppo.batch_size=8", "ppo.ppo_epochs=2",
            "generation.max_new_tokens_range=[5,8]", "generation.max_new_tokens=8", "run.cpu_threads=1",
            "run.device=cpu", "logging.progress_bar=false", "optim.lr=0.01", f"run.total_steps={STEPS}",
            "checkpoint.every_steps=0", f"run.output_dir={out}"]


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if x.endswith("}")]  # (the last line may be half written)


@contextmanager
def local_cluster(nodes: int, *paths: Path) -> Iterator[LocalSlurm]:
    """A started LocalSlurm of `nodes` nodes. Afterwards every job and daemon is stopped, and no process of the test
    may be left (none mentioning `paths` or the cluster's folder, no SLURM/munge process started since)."""
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (slurmd) and munge (munged): needs root")
    before = _processes()
    root = Path(tempfile.mkdtemp(prefix="detoxrl-slurm-"))  # not under pytest's 0700 tmp: munged must reach it
    root.chmod(0o755)
    cluster = LocalSlurm(root, nodes)
    try:
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster of {nodes} node(s) up in {time.monotonic() - t0:.1f} s")
        yield cluster
    finally:
        cluster.stop()
        left = _left_behind(before, *paths, root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left behind: {left}"


def _job_env(cluster: LocalSlurm, **settings: str) -> dict[str, str]:
    """The submitting shell: this venv on PATH, CPU training processes, slurm/detoxrl_job.sh's settings."""
    return {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "RECIPE": "configs/ppo/flan_t5_cola_neutral.yaml", "GPUS_PER_NODE": "0", "DETOXRL_HOME": str(REPO),
            "STOP_TIMEOUT": "60", **settings}


def _job_log(folder: Path) -> str:
    return "".join((folder / f).read_text() for f in ("slurm.out", "slurm.err") if (folder / f).exists())


def _ended(cluster: LocalSlurm, job_id: str) -> bool:
    return cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.mark.slow
def test_sbatch_script_requeues_on_usr1_and_resumes_exactly(test_models, tmp_path):
    with local_cluster(1, tmp_path) as cluster:
        t0 = time.monotonic()
        env = _job_env(cluster, STRATEGY="ddp", PROCS_PER_NODE="2")
        jobs = {}
        for name in ("reference", "signalled"):
            out = tmp_path / name
            out.mkdir()
            jobs[name] = cluster.run("sbatch", "--parsable", "-c", "1", "--job-name", f"detoxrl-{name}",
                                     f"--output={out}/slurm.out", f"--error={out}/slurm.err", str(SBATCH),
                                     *_tiny_overrides(test_models, out / "run"), env=env).stdout.strip()

        def job_log(name: str) -> str:
            return _job_log(tmp_path / name)

        def wait_for(cond, timeout: float, what: str) -> None:
            end = time.monotonic() + timeout
            while not cond():
                if time.monotonic() > end:
                    raise TimeoutError(f"waited {timeout} s for {what}\n{job_log('signalled')[-4000:]}\n"
                                       f"{job_log('reference')[-2000:]}\n{cluster.logs()}")
                time.sleep(0.2)

        signalled = tmp_path / "signalled" / "run"
        wait_for(lambda: len(_steps_logged(signalled)) >= 2, 120, "the signalled job's second step")
        cluster.run("scancel", "--signal=USR1", "--batch", jobs["signalled"])
        stopped_at = len(_steps_logged(signalled))
        wait_for(lambda: _ended(cluster, jobs["signalled"]) and _ended(cluster, jobs["reference"]), 180,
                 "both jobs to end")
        info = cluster.job(jobs["signalled"])
        log = job_log("signalled")
        assert info["JobState"] == "COMPLETED", log[-4000:]
        assert info["Restarts"] == "1", log[-4000:]                                     # it requeued itself
        assert "USR1 received" in log and "requeueing job" in log and "(restart 1)" in log
        assert "stopped by SIGUSR1 after step" in log
        run_info = json.loads((signalled / "run_info.json").read_text())
        resumed_step = int(Path(run_info["resumed_from"]).name.split("-")[1])          # the second run's
        assert stopped_at <= resumed_step < STEPS, (stopped_at, resumed_step)          # not from step 0
        assert f"resumed from {run_info['resumed_from']} at step {resumed_step}" in log
        assert run_info["world_size"] == 2
        assert _steps_logged(signalled) == list(range(1, STEPS + 1))                   # each step once, all done
        assert cluster.job(jobs["reference"])["JobState"] == "COMPLETED", job_log("reference")[-4000:]
        for f in ("adapter_model.safetensors", "value_head.safetensors"):
            want = load_file(str(tmp_path / "reference" / "run" / "final" / f))
            got = load_file(str(signalled / "final" / f))
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f
        print(f"SLURM test body done in {time.monotonic() - t0:.1f} s")


MULTI_STEPS = 2


def _final(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(run / "final" / "adapter_model.safetensors")),
            **{f"v_head.{k}": v for k, v in load_file(str(run / "final" / "value_head.safetensors")).items()}}


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_node_sbatch_script_trains_on_two_nodes(test_models, tmp_path):
    """slurm/ppo_multi_node.sbatch on two SLURM nodes (two slurmd on this host), ZeRO-2: one srun task per node runs
    detoxrl-launch with that node's machine rank and node1's NodeAddr, each machine starts its own reward scorer,
    both ranks end with the same weights and the policy trained. (That two machines equal one machine of the same
    world size, bitwise, is tests/test_accelerate_configs.py's check of the same launcher commands; a one-node job
    next to this one equalled it too when it was added, at twice the CPU time.)"""
    with local_cluster(2, tmp_path) as cluster:
        t0 = time.monotonic()
        # the CoLA term alone (one scorer per machine: fewer processes on a small machine), on scorers
        term = f"{{model: {test_models['roberta_cola']}, label: LABEL_1, output: logit, score: response}}"
        scorers = [f"reward.terms=[{term}]", "reward.placement=scorer", "scorer.batching=per_rank"]
        jobs = {}
        for name, script, settings in (
                ("two", REPO / "slurm" / "ppo_multi_node.sbatch",  # STRATEGY: the script's multi_node
                 {"PROCS_PER_NODE": "1", "DETOXRL_DEBUG_DIR": str(tmp_path / "two" / "debug")}),):
            out = tmp_path / name
            out.mkdir()
            overrides = [*_tiny_overrides(test_models, out / "run"), f"run.total_steps={MULTI_STEPS}", *scorers]
            jobs[name] = cluster.run("sbatch", "--parsable", "-c", "1", "--job-name", f"detoxrl-{name}",
                                     f"--output={out}/slurm.out", f"--error={out}/slurm.err", str(script),
                                     *overrides, env=_job_env(cluster, **settings)).stdout.strip()
        end = time.monotonic() + 240
        while not all(_ended(cluster, j) for j in jobs.values()):
            if time.monotonic() > end:
                raise TimeoutError(f"waited 240 s for the job\n{_job_log(tmp_path / 'two')[-4000:]}\n"
                                   f"{cluster.logs()}")
            time.sleep(0.2)
        print(f"the job was done in {time.monotonic() - t0:.1f} s")
        log = _job_log(tmp_path / "two")
        job = cluster.job(jobs["two"])
        assert (job["JobState"], job["NodeList"], job["NumNodes"]) == ("COMPLETED", "node[1-2]", "2"), log[-4000:]
        for rank, node in ((0, "node1"), (1, "node2")):                                 # one srun task per node
            assert f"{node}] node {rank} of 2: detoxrl-launch --strategy multi_node" in log
            assert f"--nodes 2 --machine-rank {rank} --main-address 127.0.0.1 " in log    # node1's NodeAddr
    two = tmp_path / "two" / "run"
    info = json.loads((two / "run_info.json").read_text())
    assert (info["num_machines"], info["world_size"], info["local_world_size"]) == (2, 2, 1)
    assert (info["distributed_type"], info["zero_stage"]) == ("DEEPSPEED", 2)
    assert [(s["machine"], s["scorer"], len(s["models"])) for s in info["scorers"]] == [(0, 0, 1), (1, 0, 1)]
    assert sorted(p.name for p in (two / "scorers").iterdir()) == ["machine-0-scorer-0.log", "machine-1-scorer-0.log"]
    w0, w1 = (load_file(str(tmp_path / "two" / "debug" / f"rank-{r:05d}-trainable.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)     # the ranks in lock-step
    metrics = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, MULTI_STEPS + 1))
    assert all(m["ppo/grad_norm"] > 0 for m in metrics)
    final = _final(two)
    lora_b = [v for k, v in final.items() if "lora_B" in k]                           # LoRA starts B at zero
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)                           # the policy moved

