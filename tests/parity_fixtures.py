"""Read the PyTorch reference fixtures written by tests/make_fixtures.py (no torch needed)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from conftest import WEIGHT_NAMES

from bdh_mlx.model import BDH, BDHConfig

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.npz"))


def read_fixture(name: str) -> dict:
    """Every array of one fixture; ``config`` decoded to a dict."""
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["config"] = json.loads(arrays["config"].tobytes().decode("utf-8"))
    return arrays


def fixture_model(fixture: dict, compute_dtype=mx.float32, **overrides) -> BDH:
    """An MLX BDH in eval mode with the fixture's config and weights."""
    model = BDH(BDHConfig.from_dict({**fixture["config"], **overrides}), compute_dtype=compute_dtype)
    model.load_weights([(k, mx.array(fixture[k])) for k in WEIGHT_NAMES], strict=True)
    model.eval()
    return model


def fixture_inputs(fixture: dict):
    return mx.array(fixture["idx"].astype(np.int32)), mx.array(fixture["targets"].astype(np.int32))
