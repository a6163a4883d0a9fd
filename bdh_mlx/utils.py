"""Small helpers shared by the library and the commands."""

import os
import tempfile
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


class eval_mode:
    """``with eval_mode(model):`` dropout off inside, the previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.training)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    A crash or Ctrl-C midway leaves the old file (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_npz(path, what: str = "file") -> dict:
    """All arrays of an ``.npz`` (never unpickling); a missing or unreadable file is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such {what}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable .npz {what} (not a zip archive: a different file, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .npz {what} ({type(e).__name__}: {e})") from None


def atomic_savez(path, arrays):
    """Write a dict of numpy arrays as one ``.npz`` file, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path, text):
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
