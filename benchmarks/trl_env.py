"""The separate virtualenv that holds TRL 1.12 for baseline B (never a dependency of detoxrl).

Built on first use, then reused: torch pinned to the version this environment runs (so pip never swaps in a
different build, nor several GB of CUDA wheels on a CPU machine), then `trl==1.12.*` and peft with a constraint
that keeps that torch. Location: $DETOXRL_TRL_VENV, else $DETOXRL_CACHE/trl-venv, else ~/.cache/detoxrl/trl-venv.
$DETOXRL_TRL_TORCH overrides the torch requirement (e.g. a CUDA build from another index:
`DETOXRL_TRL_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

TRL_REQUIREMENT = "trl==1.12.*"  # the last TRL with a PPO trainer (trl.experimental.ppo); 1.13 removed it
INSTALL_TIMEOUT = 1200


class TRLUnavailable(RuntimeError):
    """The TRL virtualenv could not be built (no network, no wheel for this platform, ...)."""


def default_venv() -> Path:
    if os.environ.get("DETOXRL_TRL_VENV"):
        return Path(os.environ["DETOXRL_TRL_VENV"]).expanduser()
    cache = os.environ.get("DETOXRL_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "detoxrl") / "trl-venv"


def torch_requirement() -> list[str]:
    if os.environ.get("DETOXRL_TRL_TORCH"):
        return shlex.split(os.environ["DETOXRL_TRL_TORCH"])
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise TRLUnavailable(f"{what}: timed out after {INSTALL_TIMEOUT} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise TRLUnavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")


def ensure_trl_venv(venv: Path | None = None, log=print) -> Path:
    """The python of a ready TRL virtualenv, building it if needed. Raises TRLUnavailable with pip's reason."""
    venv = Path(venv or default_venv())
    python = venv / "bin" / "python"
    marker = venv / ".detoxrl-ready.json"
    want = {"trl": TRL_REQUIREMENT, "torch": torch_requirement()}
    if marker.is_file() and python.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return python
        except ValueError:
            pass
    venv.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(venv) + ".lock"):
        if marker.is_file() and python.is_file() and json.loads(marker.read_text()) == want:
            return python  # built by another process while we waited
        log(f"building the TRL virtualenv at {venv} ({' '.join(want['torch'])}, {TRL_REQUIREMENT}; ~1-2 min once)")
        if not python.is_file():
            _run([sys.executable, "-m", "venv", str(venv)], "creating the virtualenv")
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run(pip + want["torch"], f"pip install {' '.join(want['torch'])}")
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        pins = [line for line in freeze.stdout.splitlines() if line.lower().startswith("torch==")]
        constraints = venv / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        _run(pip + ["-c", str(constraints), TRL_REQUIREMENT, "peft"], f"pip install {TRL_REQUIREMENT} peft")
        probe = subprocess.run([str(python), "-c", "import trl.experimental.ppo"], capture_output=True, text=True,
                               env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        if probe.returncode != 0:
            raise TRLUnavailable(f"trl.experimental.ppo does not import in {venv}:\n{probe.stderr[-2000:]}")
        marker.write_text(json.dumps(want))
    return python
