import os

import numpy as np
import pytest

import bdh_mlx  # noqa: F401  (first: it gives MLX the fast BLAS before any test imports mlx.core)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A tiny model and batch shape for training tests (each run takes well under a second).
TINY_RUN = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2",
            "--sample-tokens", "0", "--no-progress"]


@pytest.fixture
def corpus_file(tmp_path):
    """A small repetitive text: easy to learn, long enough for a 90/10 split at block size 64."""
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


# The official parameter names (no attn.freqs: the RoPE frequencies are a constant, not saved).
WEIGHT_NAMES = ("embed.weight", "encoder", "encoder_v", "decoder", "lm_head")
FP32_TOL = 1e-4


def assert_close(got, want, what, tol=FP32_TOL):
    """``got`` equals ``want`` (same shape) within ``tol``, absolute and relative; the message says by how much."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    assert np.allclose(got, want, atol=tol, rtol=tol), f"{what}: max abs diff {diff:.3g}"


def with_engine(model, engine, compute_dtype=None):
    """A model with ``model``'s config and weights (the same arrays), in its mode, decoding with ``engine``."""
    from bdh_mlx.model import BDH

    other = BDH(model.config, rope_freqs=model._freqs, engine=engine,
                compute_dtype=model.compute_dtype if compute_dtype is None else compute_dtype)
    other.update(model.parameters())
    return other.train(model.training)
