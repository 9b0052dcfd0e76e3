"""Stopping cleanly: SIGTERM, SIGINT and SIGUSR1 finish the current step, write a checkpoint (all ranks together) and
exit with status 75; the resumed run ends exactly where an uninterrupted one does; a second Ctrl-C aborts at once.
A job started in the background (SIGINT ignored) keeps ignoring SIGINT; handlers are restored to what was found.

The tests set the SIGINT disposition they need themselves (`foreground` / `background`), so they pass however
pytest was started: from a terminal, or as `nohup make test &`, whose shell hands it SIGINT ignored."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from detoxrl.train import checkpoint as ckpt
from detoxrl.train import loop, signals
from detoxrl.train.cli import EXIT_ABORTED, EXIT_STOPPED

from conftest import REPO
from test_resume import (assert_same_metrics, assert_same_weights, free_port, metrics, overrides, run_inproc,
                         weights)
from test_train import RECIPES

LINEAR = ("optim.scheduler=linear", "optim.warmup_steps=2")  # a schedule that depends on run.total_steps
T, I, U = signal.SIGTERM, signal.SIGINT, signal.SIGUSR1


@contextlib.contextmanager
def sigint_starting_as(handler) -> Iterator[None]:
    """SIGINT set to `handler` for the duration, then restored to what the test process had."""
    found = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, found)


@pytest.fixture(autouse=True)
def foreground():
    """As started from a terminal: Python's KeyboardInterrupt handler (also what a child process then starts with)."""
    with sigint_starting_as(signal.default_int_handler):
        yield


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}


def signals_during_step(monkeypatch, step: int, *signums: int) -> None:
    """Send `signums` to this process in the middle of PPO step `step` (1-based)."""
    real = loop.draw_max_new_tokens

    def draw(cfg, index: int) -> int:
        if index == step - 1:
            for s in signums:
                os.kill(os.getpid(), s)
        return real(cfg, index)

    monkeypatch.setattr(loop, "draw_max_new_tokens", draw)


@pytest.fixture(scope="module")
def straight4(test_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight4")
    run_inproc(test_models, out, 4, *LINEAR)
    return out


@pytest.mark.parametrize("signum", [T, I, U], ids=lambda s: signal.Signals(s).name)
def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(signum, test_models, straight4, tmp_path,
                                                                           monkeypatch):
    before = handlers()
    signals_during_step(monkeypatch, 2, signum)
    result = run_inproc(test_models, tmp_path, 4, *LINEAR)
    assert result.stopped_by == signal.Signals(signum).name and result.steps_done == 2
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]                # the current step was finished
    assert ckpt.is_valid(tmp_path / "checkpoints" / "step-000002") is None  # checkpoint.every_steps is 0
    assert not (tmp_path / "final").exists()
    assert handlers() == before                                             # handlers restored
    monkeypatch.undo()
    result = run_inproc(test_models, tmp_path, 4, *LINEAR)                  # "run the same command again"
    assert result.stopped_by is None and result.steps_done == 4
    assert_same_weights(weights(straight4), weights(tmp_path))
    assert_same_metrics(metrics(straight4), metrics(tmp_path))


@pytest.mark.parametrize("signums, aborts", [((I, I), True), ((I, T), True), ((U, I), True), ((T, I), True),
                                             ((T, T), False), ((U, U), False), ((T, U), False)],
                         ids=lambda v: "-".join(signal.Signals(s).name[3:] for s in v) if isinstance(v, tuple)
                         else ("aborts" if v else "stops"))
def test_second_ctrl_c_aborts_at_once_repeated_requests_do_not(signums, aborts, test_models, tmp_path, monkeypatch):
    before = handlers()
    signals_during_step(monkeypatch, 2, *signums)
    if aborts:
        with pytest.raises(KeyboardInterrupt):
            run_inproc(test_models, tmp_path, 4)
        assert [m["step"] for m in metrics(tmp_path)] == [1]               # step 2 was not finished
        assert not list(tmp_path.glob("checkpoints/step-*"))                # no checkpoint written
    else:
        result = run_inproc(test_models, tmp_path, 4)
        assert result.stopped_by == signal.Signals(signums[0]).name and result.steps_done == 2
    assert handlers() == before                                             # restored, after an abort too


def test_a_background_job_keeps_sigint_ignored_and_stops_on_sigterm(test_models, tmp_path, monkeypatch):
    """`cmd &` / `nohup cmd &`: the shell hands the job SIGINT ignored; Ctrl-C is not meant for it."""
    with sigint_starting_as(signal.SIG_IGN):
        before = handlers()
        signals_during_step(monkeypatch, 2, I, T)
        result = run_inproc(test_models, tmp_path, 4)
        assert result.stopped_by == "SIGTERM" and result.steps_done == 2  # SIGINT ignored, SIGTERM a clean stop
        assert handlers() == before and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


# ----------------------------------------------------------------------------------------------------------------
# Real processes: the command line's exit status, and 2 ranks agreeing on the step to stop after
# ----------------------------------------------------------------------------------------------------------------
def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= n):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no step {n} (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def test_command_line_exit_status_on_sigterm_and_on_a_second_ctrl_c(test_models, tmp_path):
    cmd = [sys.executable, "-m", "detoxrl.train", "--config", str(RECIPES / "flan_t5_cola_neutral.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "term"
    proc = subprocess.Popen([*cmd, *overrides(test_models, out, 500)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, stderr[-3000:]
    last = metrics(out)[-1]["step"]
    assert f"stopped by SIGTERM after step {last}" in stdout
    assert ckpt.find_resume_checkpoint(out / "checkpoints", "auto", True).name == f"step-{last:06d}"

    out = tmp_path / "abort"
    proc = subprocess.Popen([*cmd, *overrides(test_models, out, 500)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_ABORTED, stderr[-3000:]
    assert "aborted" in stderr and "stopped by" not in stdout


def _children(pid: int) -> dict[int, int]:
    """{pid: RANK} of the direct children of `pid` (torchrun's workers)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
            if ranks:
                found[int(d.name)] = int(ranks[0])
    return found


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stop_together_on_a_signal_to_one_rank_or_to_the_launcher(test_models, tmp_path):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "detoxrl.train",
           "--config", str(RECIPES / "flan_t5_cola_neutral.yaml"), *overrides(test_models, out, 500)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def start() -> subprocess.Popen:
        return subprocess.Popen([*cmd[:2], "--main_process_port", str(free_port()), *cmd[2:]], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    # 1. SIGUSR1 to rank 1 only: rank 0 learns of it through the step-boundary all-reduce
    proc = start()
    try:
        wait_for_steps(out, 1, proc)
        workers = _children(proc.pid)
        assert sorted(workers.values()) == [0, 1], workers
        os.kill(next(p for p, r in workers.items() if r == 1), signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = metrics(out)[-1]["step"]
    assert f"stopped after step {first} of 500 (SIGUSR1)" in stderr                      # rank 1
    assert f"stopped after step {first} of 500 (a signal on another rank)" in stderr     # rank 0
    assert "exitcode  : 75" in stderr                                   # torchrun's report of the ranks' status
    folder = out / "checkpoints" / f"step-{first:06d}"
    assert ckpt.is_valid(folder) is None
    assert sorted(p.name for p in (folder / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]

    # 2. the same command resumes; SIGTERM to the launcher: torchrun relays it to both ranks
    proc = start()
    try:
        wait_for_steps(out, first + 1, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"resumed from {folder} at step {first}" in stderr
    second = metrics(out)[-1]["step"]
    assert stderr.count(f"stopped after step {second} of 500 (SIGTERM)") == 2, stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, second + 1))
    assert json.loads((out / "checkpoints" / f"step-{second:06d}" / "trainer_state.json").read_text())["step"] == second
