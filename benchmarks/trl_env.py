"""The separate virtualenvs that hold the peers (never dependencies of detoxrl): TRL 1.12 (baseline B, causal
PPO) and TRL 0.11.4 (the seeds' own library: the old `step()` API, T5 PPO via AutoModelForSeq2SeqLMWithValueHead).

Built on first use, then reused: torch pinned to the version this environment runs (so pip never swaps in a
different build, nor several GB of CUDA wheels on a CPU machine), then the peer's pins with a constraint that
keeps that torch. TRL 1.12 runs on the very packages detoxrl runs on (torch, transformers, accelerate, peft,
datasets: the versions its pins accept), so its venv is layered: a `.pth` file puts this environment's
site-packages after the venv's own, and pip installs only TRL itself (seconds, instead of a second copy of torch);
anything TRL needed in another version would be installed into the venv and shadow the layer. TRL 0.11.4 needs
transformers 4, so its venv is a full one. Location: $DETOXRL_TRL_VENV (TRL 1.12) / $DETOXRL_TRL011_VENV (TRL 0.11.4), else
$DETOXRL_CACHE/<name>, else ~/.cache/detoxrl/<name>. $DETOXRL_TRL_TORCH overrides the torch requirement (e.g. a
CUDA build from another index: `DETOXRL_TRL_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TRL_REQUIREMENT = "trl==1.12.*"  # the last TRL with a PPO trainer (trl.experimental.ppo); 1.13 removed it
INSTALL_TIMEOUT = 1200


@dataclass(frozen=True)
class Peer:
    """One peer library's virtualenv: what to install after torch, and an import that proves it works."""
    label: str                       # as printed in RESULTS.md
    venv_name: str                   # folder under the cache
    env_var: str                     # overrides the location
    requirements: tuple[str, ...]
    probe: str                       # python source that must run in the venv
    layered: bool = False            # on top of this environment's packages (see the module docstring)


TRL_1_12 = Peer("TRL 1.12", "trl-venv", "DETOXRL_TRL_VENV", (TRL_REQUIREMENT, "peft"), "import trl.experimental.ppo",
                layered=True)
# The pins that install together with torch 2.13 (checked on this machine); trl 0.11.4 imports `rich` without
# declaring it.
TRL_0_11 = Peer("TRL 0.11.4", "trl011-venv", "DETOXRL_TRL011_VENV",
                ("trl==0.11.4", "transformers==4.46.3", "accelerate==1.1.1", "peft==0.13.2", "datasets==3.1.0",
                 "tokenizers==0.20.3", "rich"),
                "from trl import PPOConfig, PPOTrainer, AutoModelForSeq2SeqLMWithValueHead")


class TRLUnavailable(RuntimeError):
    """The TRL virtualenv could not be built (no network, no wheel for this platform, ...)."""


def default_venv(peer: Peer = TRL_1_12) -> Path:
    if os.environ.get(peer.env_var):
        return Path(os.environ[peer.env_var]).expanduser()
    cache = os.environ.get("DETOXRL_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "detoxrl") / peer.venv_name


def torch_requirement() -> list[str]:
    if os.environ.get("DETOXRL_TRL_TORCH"):
        return shlex.split(os.environ["DETOXRL_TRL_TORCH"])
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


def _site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def _layer_on_this_environment(python: Path) -> None:
    """A .pth file in the venv's site-packages that appends this environment's site-packages to its sys.path."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_detoxrl_layer.pth").write_text(_site_packages() + "\n")


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise TRLUnavailable(f"{what}: timed out after {INSTALL_TIMEOUT} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise TRLUnavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")


def ensure_trl_venv(venv: Path | None = None, log=print, peer: Peer = TRL_1_12) -> Path:
    """The python of a ready peer virtualenv, building it if needed. Raises TRLUnavailable with pip's reason."""
    venv = Path(venv or default_venv(peer))
    python = venv / "bin" / "python"
    marker = venv / ".detoxrl-ready.json"
    want: dict = ({"trl": TRL_REQUIREMENT, "torch": torch_requirement()} if peer == TRL_1_12  # the marker of old venvs
                  else {"requirements": list(peer.requirements), "torch": torch_requirement()})
    if peer.layered:
        want["layered_on"] = _site_packages()
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
        log(f"building the {peer.label} virtualenv at {venv} ({' '.join(want['torch'])}, "
            f"{' '.join(peer.requirements)}; ~1-2 min once)")
        if not python.is_file():
            _run([sys.executable, "-m", "venv", str(venv)], "creating the virtualenv")
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        if peer.layered:
            _layer_on_this_environment(python)
        else:
            _run(pip + want["torch"], f"pip install {' '.join(want['torch'])}")
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        pins = [line for line in freeze.stdout.splitlines() if line.lower().startswith("torch==")]
        constraints = venv / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        _run(pip + ["-c", str(constraints), *peer.requirements], f"pip install {' '.join(peer.requirements)}")
        probe = subprocess.run([str(python), "-c", peer.probe], capture_output=True, text=True,
                               env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        if probe.returncode != 0:
            raise TRLUnavailable(f"`{peer.probe}` fails in {venv}:\n{probe.stderr[-2000:]}")
        marker.write_text(json.dumps(want))
    return python
