"""train/atomic.py: a folder is replaced whole or not at all, through errors, kills and both swap methods."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detoxrl.train import atomic
from detoxrl.train.atomic import atomic_directory, aside_path, recover, replace_directory, temporary_path


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


@pytest.fixture(params=["exchange", "rename-aside"])
def swap(request, monkeypatch) -> str:
    """Run a test with Linux's RENAME_EXCHANGE and with the two-rename fallback other systems get."""
    if request.param == "rename-aside":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_creates_then_replaces_the_folder_whole(tmp_path, swap):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp == temporary_path(final) and not final.exists() and list(tmp.iterdir()) == []
        write(tmp, a="1", b="1")
    assert contents(final) == {"a": "1", "b": "1"} and leftovers(final) == []
    with atomic_directory(final) as tmp:
        write(tmp / "sub", c="2")
        assert contents(final) == {"a": "1", "b": "1"}             # untouched while the new one is built
    assert contents(final) == {"sub/c": "2"} and leftovers(final) == []


def test_an_error_in_the_body_keeps_the_old_folder(tmp_path, swap):
    final = tmp_path / "out"
    write(final, a="old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(final) as tmp:
            write(tmp, a="new", b="new")
            raise RuntimeError("half-way")
    assert contents(final) == {"a": "old"} and leftovers(final) == []


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final, tmp = tmp_path / "out", tmp_path / "out.tmp"
    write(final, a="old")
    write(tmp, a="new")
    real = Path.rename

    def rename(self, target):
        if self == tmp:
            raise OSError("disk gone")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        replace_directory(tmp, final)
    assert contents(final) == {"a": "old"} and not aside_path(final).exists()


def test_kill_9_in_the_middle_leaves_the_old_folder_and_the_next_writer_cleans_up(tmp_path):
    final = tmp_path / "out"
    write(final, a="old")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from detoxrl.train.atomic import atomic_directory
        with atomic_directory(Path({str(final)!r})) as tmp:
            (tmp / "a").write_text("new, half written")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert contents(final) == {"a": "old"} and leftovers(final) == ["out.tmp"]
    with atomic_directory(final) as tmp:
        write(tmp, a="new")
    assert contents(final) == {"a": "new"} and leftovers(final) == []


def test_recover_after_a_kill_at_each_point_of_the_swap(tmp_path):
    final, tmp, old = tmp_path / "out", tmp_path / "out.tmp", tmp_path / "out.old"
    # between the fallback's two renames: no `final`, the old folder aside, the new one complete
    write(old, a="old")
    write(tmp, a="new")
    recover(final)
    assert contents(final) == {"a": "old"} and leftovers(final) == []
    # after RENAME_EXCHANGE, before the old folder (now under the temporary name) was deleted
    write(tmp, a="old, being deleted")
    recover(final)
    assert contents(final) == {"a": "old"} and leftovers(final) == []
    # after the fallback's second rename, while deleting the old folder
    write(old, a="old, being deleted")
    recover(final)
    assert contents(final) == {"a": "old"} and leftovers(final) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RENAME_EXCHANGE is Linux only")
def test_rename_exchange_swaps_in_one_step_here(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, x="a")
    write(b, x="b")
    if not atomic._exchange(a, b):
        pytest.skip("this filesystem has no RENAME_EXCHANGE: the rename-aside fallback is used")
    assert contents(a) == {"x": "b"} and contents(b) == {"x": "a"}
    assert os.path.isdir(a) and os.path.isdir(b)
