"""A training run's folder: its files, its lock, and the resume state that lets it continue exactly.

    run.json                 the options the run started with (written before the first step)
    metrics.jsonl            one JSON record per logged step (appended; a torn last line is trimmed on resume)
    step_NNNNNNN.npz         the model every --save-every steps, with .optimizer.npz and .json beside it
    last.npz, last.json      the latest resume point (last.json names its files and is written last)
    best.npz, best.json      the model with the lowest validation loss so far
    .lock                    held (flock) by the one process that trains in the folder

Every file is written atomically, so a crash at any point leaves the previous resume point usable.
"""

import fcntl
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from bdh_mlx.errors import CheckpointError, ConfigError
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import atomic_savez, atomic_write, atomic_write_text, read_npz

RUN_FILES = ("run.json", "last.json", "metrics.jsonl", "last.npz", "best.npz")


def link_or_copy(src: Path, dst: Path):
    """Point ``dst`` at the file ``src`` atomically (a hard link when possible, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(dst, lambda f: f.write(src.read_bytes()))


class RunFolder:
    """The files of one run (see the module docstring); ``lock()`` makes it this process's alone."""

    def __init__(self, path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._lock_fd = None

    def holds_run(self) -> bool:
        return self.path.is_dir() and any((self.path / name).exists() for name in RUN_FILES)

    def check_usable(self):
        """A clear error now for a path that can never be a run folder (a file, or under a file)."""
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                if not parent.is_dir():
                    what = "is a file" if parent == self.path else f"is under {parent}, which is a file"
                    raise ConfigError(f"{self.path} {what}; --out needs a folder")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise ConfigError(f"{parent}: not writable; choose another --out")
                return

    def lock(self):
        """Take the folder for this process (released on any exit, even kill -9); clear half-written leftovers."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{self.path} is in use by another training process (pid {owner})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        for leftover in [*self.path.glob(".*.tmp"), *self.path.glob(".*.link")]:
            leftover.unlink(missing_ok=True)  # from a write that was killed midway

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # --- what the run started with, and how far it got ---

    def write_start(self, args: dict):
        atomic_write_text(self.path / "run.json", json.dumps({"args": args}, indent=1))

    def read_start(self) -> dict | None:
        path = self.path / "run.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["args"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None

    def read_resume_state(self) -> dict | None:
        """The last resume point, or None if the run never saved one."""
        path = self.path / "last.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            files = [self.path / state["model"], self.path / state["optimizer"]]
            state["step"], state["args"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable resume state ({type(e).__name__}: {e})") from None
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path}: refers to {f.name}, which is missing")
        return state

    def save_resume_point(self, step: int, model, optimizer, meta: dict, keep: bool):
        """``step_NNNNNNN.{npz,optimizer.npz,json}``, then ``last.*`` pointing at them, last.json last.

        A resume point that is not a periodic checkpoint (``keep`` False) is removed once superseded.
        """
        stem = f"step_{step:07d}"
        previous = self.read_resume_state()
        checkpoint.save(model, self.path / f"{stem}.npz")
        optimizer_state = {k: np.array(v) for k, v in tree_flatten(optimizer.state)}
        atomic_savez(self.path / f"{stem}.optimizer.npz", optimizer_state)
        state = {"step": step, "model": f"{stem}.npz", "optimizer": f"{stem}.optimizer.npz", "keep": keep, **meta}
        text = json.dumps(state, indent=1)
        atomic_write_text(self.path / f"{stem}.json", text)
        link_or_copy(self.path / f"{stem}.npz", self.path / "last.npz")
        link_or_copy(self.path / f"{stem}.optimizer.npz", self.path / "last.optimizer.npz")
        atomic_write_text(self.path / "last.json", text)
        if previous is not None and not previous.get("keep", True) and previous["step"] != step:
            old = f"step_{previous['step']:07d}"
            for suffix in (".npz", ".optimizer.npz", ".json"):
                (self.path / f"{old}{suffix}").unlink(missing_ok=True)

    def load_optimizer_state(self, resume_state: dict) -> dict:
        arrays = read_npz(self.path / resume_state["optimizer"], "optimizer state")
        return tree_unflatten([(k, mx.array(v)) for k, v in arrays.items()])

    # --- the best model ---

    def read_best(self, best: dict) -> dict:
        """The better of ``best`` and what best.json says (it may be newer than the resume point)."""
        path = self.path / "best.json"
        if not path.is_file():
            return best
        try:
            on_disk = json.loads(path.read_text())
            return min(best, on_disk, key=lambda b: b["val_loss"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None

    def write_best(self, model, best: dict):
        checkpoint.save(model, self.path / "best.npz")
        atomic_write_text(self.path / "best.json", json.dumps(best))

    # --- metrics ---

    def read_metrics(self) -> list:
        """The records of metrics.jsonl; a torn last line (a kill during an append) is left out."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:
                    break
                raise CheckpointError(f"{self.metrics_path}: line {i + 1} is not JSON") from None
        return records

    def truncate_metrics(self, step: int):
        """Keep the records up to ``step`` (later ones were logged by a run that stopped before saving them)."""
        if self.metrics_path.exists():
            kept = [r for r in self.read_metrics() if r["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, record: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
