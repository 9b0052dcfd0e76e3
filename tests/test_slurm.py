"""The shipped sbatch script on a real one-node SLURM cluster (slurmctld + slurmd + munged on this machine).

Installs Debian's `slurm-wlm` and `munge` with apt-get when they are missing (so it needs root and apt), starts the
daemons in the foreground as children of this test (munged as the munge user), submits
`slurm/ppo_single_node.sbatch` twice with the tiny recipe on CPU (2 processes each; the jobs share the node):
an uninterrupted reference, and a run that gets `scancel --signal=USR1 --batch` mid-run. The signalled job must
checkpoint, requeue itself, resume from that checkpoint, finish its steps and end with the reference's weights.
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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_resume import free_port

STEPS = 8
SBATCH = REPO / "slurm" / "ppo_single_node.sbatch"


@pytest.mark.parametrize("script", ["ppo_single_node.sbatch", "ppo_multi_node.sbatch"])
def test_sbatch_scripts_requeue_signal_ahead_and_append(script):
    """The options the requeue/resume flow depends on (the multi-node script cannot run on a one-node cluster)."""
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
    """A one-node cluster on localhost, every daemon a child process of the test (so it can be stopped for sure)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
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
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
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
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env.pop("SLURM_JOB_ID", None)

    def _start(self, cmd: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, **kwargs))

    def start(self) -> None:
        m = self.root / "munge"
        self._start(["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                    user="munge", group="munge", extra_groups=[])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged to create its socket")
        self._start(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._start(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, 30, "the node to be idle")

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


@pytest.mark.slow
def test_sbatch_script_requeues_on_usr1_and_resumes_exactly(test_models, tmp_path):
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (slurmd) and munge (munged): needs root")
    before = _processes()
    root = Path(tempfile.mkdtemp(prefix="detoxrl-slurm-"))  # not under pytest's 0700 tmp: munged must reach it
    root.chmod(0o755)
    cluster = LocalSlurm(root)
    try:
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - t0:.1f} s")
        env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
               "RECIPE": "configs/ppo/flan_t5_cola_neutral.yaml", "STRATEGY": "ddp", "GPUS_PER_NODE": "0",
               "PROCS_PER_NODE": "2", "DETOXRL_HOME": str(REPO), "STOP_TIMEOUT": "60"}
        jobs = {}
        for name in ("reference", "signalled"):
            out = tmp_path / name
            out.mkdir()
            jobs[name] = cluster.run("sbatch", "--parsable", "-c", "1", "--job-name", f"detoxrl-{name}",
                                     f"--output={out}/slurm.out", f"--error={out}/slurm.err", str(SBATCH),
                                     *_tiny_overrides(test_models, out / "run"), env=env).stdout.strip()

        def job_log(name: str) -> str:
            return "".join((tmp_path / name / f).read_text() for f in ("slurm.out", "slurm.err")
                           if (tmp_path / name / f).exists())

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

        def finished(name: str) -> bool:
            return cluster.job(jobs[name]).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

        wait_for(lambda: finished("signalled") and finished("reference"), 180, "both jobs to end")
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
    finally:
        cluster.stop()
        left = _left_behind(before, tmp_path, root)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left behind: {left}"
