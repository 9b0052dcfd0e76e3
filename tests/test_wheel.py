"""A wheel built from the repository works without the checkout: `detoxrl-launch --dry-run` and a 2-step demo,
run from a folder outside the checkout by a fresh virtualenv that has the wheel installed.

How the fresh venv gets its dependencies, cheaply and honestly: it is created empty (`python -m venv
--without-pip`), the wheel is installed into it with `--no-deps --no-index`, and one `.pth` file appends the test
venv's site-packages to its `sys.path`, so torch, transformers & co. are the very same installed copies (no
download, no minutes of installing). `detoxrl` itself comes from the fresh venv's own site-packages, which come
first on `sys.path` (checked: `detoxrl.train.__file__` must be inside the fresh venv). The test venv holds detoxrl
only as an editable install, whose import hook is a `.pth` file of its own; `.pth` files in a folder added by a
`.pth` line are not run, so that hook stays off and the checkout cannot leak in. The wheel is built with
`--no-build-isolation` (the test venv's setuptools; no index needed) from a copy of the files git knows, so build
outputs never land in the checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def source_files() -> list[str]:
    """The repository's files as git sees them (tracked, plus new files that are not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git to list the repository's files")
    return [f for f in out.splitlines() if (REPO / f).is_file() or (REPO / f).is_symlink()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `bin/` folder of a fresh venv with the wheel built from this repository installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():  # launch/configs -> ../configs, configs/ppo/demo.yaml: links, as in a clone
            os.symlink(os.readlink(REPO / name), src / name)
        else:
            shutil.copy2(REPO / name, src / name)
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                "-w", str(root / "dist"), "-q")
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("detoxrl-*.whl"))
    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "detoxrl-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
               str(wheel))
    assert done.returncode == 0, done.stderr[-3000:]
    where = run(str(python), "-c", "import detoxrl.train, detoxrl.launch; print(detoxrl.train.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where  # the wheel's copy, not the checkout
    return venv / "bin"


def outside(tmp_path: Path) -> dict[str, object]:
    """Run from a folder outside the checkout, with nothing pointing back at it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 600}


def test_launch_dry_run_from_the_wheel_names_configs_that_exist(installed, tmp_path):
    proc = subprocess.run([str(installed / "detoxrl-launch"), "--strategy", "zero2", "--gpus", "0", "--dry-run"],
                          **outside(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert "accelerate" in command and command[-2:] == ["-m", "detoxrl.train"], command
    files = {opt: Path(command[command.index(opt) + 1]) for opt in ("--config_file", "--deepspeed_config_file")}
    missing = [f"{opt} {path}" for opt, path in files.items() if not path.is_file()]
    assert not missing, f"the printed command names files that do not exist: {missing}"
    assert all(str(installed.parent) in str(path) for path in files.values()), files  # the wheel's own copies


def test_demo_runs_from_the_wheel_outside_the_checkout(installed, demo_assets, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([str(installed / "detoxrl-train"), "run.total_steps=2", f"run.output_dir={out}",
                           "logging.progress_bar=false"], **outside(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo assets: using cache" in proc.stderr  # the session's demo cache (DETOXRL_CACHE), not rebuilt
    assert re.search(r"held-out toxicity \(40 prompts x 8 samples\): before [\d.]+ .* after [\d.]+", proc.stdout), proc.stdout
    assert f"done: 2 steps; adapter + value head in {out / 'final'}" in proc.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file() and len((out / "metrics.jsonl").read_text()
                                                                           .splitlines()) == 2
