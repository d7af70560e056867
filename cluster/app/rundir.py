"""A run directory: what it holds, and the rules that keep it the user's.

    run.json      the run's full configuration (written atomically)
    results.db    every candidate (SQLite, or a server database named by a SQLAlchemy URL)
    store/        the Arrow token store and its tokenizer
    checkpoints/  candidates' training state between hurdle rungs (this session only)
    promoted/     ``chimera promote``'s model directory (by default)

Everything is found relative to the directory itself, so a run can be moved or copied. A new
run never starts where something is already, and one process at a time holds a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

CONFIG_FILE = "run.json"
DATABASE_FILE = "results.db"
STORE_DIR = "store"
CHECKPOINT_DIR = "checkpoints"  # candidates' training state between hurdle rungs


class RunDirError(ValueError):
    """A directory that is not a run where one is needed, or a run where a new one would go."""


def check_new_run_dir(run_dir: str | Path) -> None:
    """Refuse to start a run where one would overwrite or mix with what is there: ``run_dir``
    must be missing or an empty directory."""
    path = Path(run_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory; choose another --run-dir")
    if (path / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir}: already holds a run; continue it with --resume "
                          f"{run_dir}, or choose another --run-dir")
    if any(path.iterdir()):
        raise RunDirError(f"{run_dir}: not empty; choose a new or empty --run-dir")


@contextlib.contextmanager
def exclusive_run(run_dir: Path):
    """Hold the run directory for this process (an advisory lock on the directory itself, so
    no file is added): a second ``chimera evolve`` on the same run, a resume started twice,
    would train candidates twice and interleave its results with the first's."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir}: another chimera evolve is running this run; let it "
                              f"finish (or stop it) first") from None
        yield
    finally:
        os.close(fd)  # releases the lock, also when this process is killed


@contextlib.contextmanager
def removed_if_left_empty(path: Path):
    """Around work that creates ``path``: on a failure, the directories it created for
    ``path`` (it and missing parents) are removed again while nothing was written into them,
    and nothing else is."""
    created = []  # what ``path.mkdir(parents=True)`` would create, deepest first
    missing = Path(os.path.abspath(path))
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        yield
    except BaseException:
        for directory in created:
            try:
                if not directory.is_dir() or any(directory.iterdir()):
                    break  # something was written (progress to keep), or it is not ours
                directory.rmdir()
            except OSError:
                break  # another process wrote into it meanwhile, or it went away: leave it
        raise
