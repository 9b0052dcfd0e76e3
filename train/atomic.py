"""Replace a folder so that readers, errors and crashes only ever meet a whole one: the old folder or the new one.

    with atomic_directory(final) as tmp:   # tmp is `<final>.tmp`, empty
        ...write the files into tmp...
    # final now holds exactly what was written; the folder it held before is gone

Every writer of a folder that others read (checkpoints, the final adapter, the demo and benchmark model caches)
goes through here. Guarantees, on one POSIX filesystem:

- While the body runs, `final` is untouched. An exception in the body removes `tmp` and leaves `final` as it was.
- Files in `tmp` (and the folder itself) are fsynced before the swap (`sync=True`), and the parent folder after it,
  so the swap survives a power loss and never exposes a folder whose files are still only in the page cache.
- The swap. On Linux, `renameat2(RENAME_EXCHANGE)` exchanges the two names in one step, so at every moment `final`
  names a complete folder: the old one, then the new one. Where that is not available (other systems, some network
  filesystems), the old folder is first renamed aside to `<final>.old`, then `tmp` to `final`: a crash between the
  two renames leaves no `final` but a complete `<final>.old`, which `recover` (run by the next `atomic_directory`
  on the same target) renames back. Either way the old folder is deleted only once the new one is in place.
- After a crash at any point (even SIGKILL), once `recover` has run, `final` is the old folder or the new one,
  never a mix, and the `.tmp` / `.old` leftovers are gone.

Not handled: several processes writing the same target at once; serialise them (the demo cache takes a file lock).
Checkpoints, which every rank writes into, use `temporary_path` and `replace_directory` directly, and their own
recovery (checkpoint.find_resume_checkpoint prefers a `.tmp` that is provably complete).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator


def temporary_path(final: Path) -> Path:
    """Where the new folder is built: a sibling, so the rename stays on one filesystem."""
    return final.with_name(final.name + ".tmp")


def aside_path(final: Path) -> Path:
    """Where the old folder waits while a swap without RENAME_EXCHANGE is in progress."""
    return final.with_name(final.name + ".old")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and `folder`) to disk."""
    for p in sorted(folder.rglob("*")):
        if not p.is_symlink():
            fsync_path(p)
    fsync_path(folder)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux renameat2); False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing what is there (see the module docstring)."""
    if final.exists() and _exchange(tmp, final):
        fsync_path(final.parent)
        shutil.rmtree(tmp)  # the old folder, now under the temporary name
        return
    old = None
    if final.exists():
        old = aside_path(final)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None and not final.exists():
            old.rename(final)  # put the old folder back: never leave neither
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Undo what a crash mid-write left: bring back `<final>.old` if `final` is missing, drop `.tmp` and `.old`."""
    tmp, old = temporary_path(final), aside_path(final)
    if old.is_dir() and not final.exists():  # killed between the two renames of a swap without RENAME_EXCHANGE
        old.rename(final)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)


@contextlib.contextmanager
def atomic_directory(final: Path, sync: bool = True) -> Iterator[Path]:
    """Yield an empty `<final>.tmp`; on a normal exit it replaces `final` (fsynced first with `sync`)."""
    final = Path(final)
    recover(final)
    tmp = temporary_path(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if sync:
            fsync_tree(tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
