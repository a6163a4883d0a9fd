"""Data-parallel training with mx.distributed on loopback: ``mlx.launch -n 2 --backend ring``."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN

from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.training import train

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")]
RUN = [*TINY_RUN, "--dropout", "0", "--log-every", "1", "--eval-every", "3", "--save-every", "3", "--lr", "3e-3"]


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now (one per process of a ring)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def launch(argv, cwd):
    """Two processes on a ring of their own: mlx.launch's default ports are fixed, so launches that overlap
    (pytest -n 2, another checkout's tests) would join each other's rings and mix their gradients."""
    command = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)), "--",
               sys.executable, "-m", "bdh_mlx", "train", *argv]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a, b, tol):
    """Equal up to float rounding: the relative norm of the difference, per weight (0: bit-identical)."""
    wa, wb = read_checkpoint(a)[1], read_checkpoint(b)[1]
    for k in wb:
        error = np.linalg.norm(wa[k] - wb[k]) / np.linalg.norm(wb[k])
        assert error <= tol, f"{k}: relative difference {error:.3g}"


def test_two_processes_train_the_model_one_process_trains(tmp_path, corpus_file):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*RUN, "--data", str(corpus_file), "--out", str(one), "--steps", "6"]) == 0
    launch([*RUN, "--data", str(corpus_file), "--out", str(two), "--steps", "6"], tmp_path)
    # Rounding (another summation order), grown by Adam's normalisation: about 1e-4; without averaging: 6e-2.
    assert_close_weights(two / "last.npz", one / "last.npz", tol=1e-3)
    for a, b in zip(records(two), records(one), strict=True):
        assert a["step"] == b["step"] and a["world_size"] == 2 and b["world_size"] == 1
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["tokens_per_sec"] > 0
    assert records(two)[-1]["val_loss"] == pytest.approx(records(one)[-1]["val_loss"], abs=1e-5)
    assert json.loads((two / "last.json").read_text())["world_size"] == 2

    # Resuming the two-process run is exact: 3 steps, then 3 more, equal 6 in one go.
    half = tmp_path / "half"
    launch([*RUN, "--data", str(corpus_file), "--out", str(half), "--steps", "3"], tmp_path)
    launch(["--resume", str(half), "--steps", "6"], tmp_path)
    assert [r["world_size"] for r in records(half)] == [2] * 6
    assert json.loads((half / "last.json").read_text())["world_size"] == 2
    assert_close_weights(half / "last.npz", two / "last.npz", tol=0)
    assert [r["train_loss"] for r in records(half)] == [r["train_loss"] for r in records(two)]


def test_two_processes_drop_out_as_one_process_does(tmp_path, corpus_file):
    """With dropout, each process draws its rows of the whole batch's masks: the run equals one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    run = [*RUN, "--dropout", "0.2", "--data", str(corpus_file), "--steps", "3"]
    assert train.main([*run, "--out", str(one)]) == 0
    launch([*run, "--out", str(two)], tmp_path)
    assert_close_weights(two / "last.npz", one / "last.npz", tol=1e-3)
    for a, b in zip(records(two), records(one), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
