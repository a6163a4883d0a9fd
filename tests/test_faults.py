"""Training under faults: kills, Ctrl-C, full disks, bad folders, two processes, poisoned weights."""

import json
import queue
import signal
import subprocess
import sys
import threading
import time

import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import TINY_RUN

from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.training import train

DIE_IN_FIRST_SAVE = """
import os, signal, sys
import numpy as np
def dying_savez(f, **arrays):
    f.write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = dying_savez
from bdh_mlx.training import train
sys.exit(train.main(sys.argv[1:]))
"""


def start_training(argv, script=None, **kwargs):
    command = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "bdh_mlx", "train", *argv]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, **kwargs)


def weights(path):
    return read_checkpoint(path)[1]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wb)


def last_logged_step(run_dir) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, corpus_bytes):
    out = tmp_path_factory.mktemp("one_go") / "run"
    corpus = out.parent / "c.txt"
    corpus.write_bytes(corpus_bytes)
    assert train.main([*TINY_RUN, "--data", str(corpus), "--out", str(out), "--steps", "12", "--save-every", "3",
                       "--log-every", "1", "--eval-every", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def corpus_bytes():
    return b"the quick brown fox jumps over the lazy dog. " * 200


def test_killed_in_its_first_checkpoint_write_the_run_can_resume(tmp_path, one_go, corpus_bytes):
    corpus, out = tmp_path / "c.txt", tmp_path / "run"
    corpus.write_bytes(corpus_bytes)
    argv = [*TINY_RUN, "--data", str(corpus), "--out", str(out), "--steps", "12", "--save-every", "3",
            "--log-every", "1", "--eval-every", "0"]
    proc = start_training(argv, script=DIE_IN_FIRST_SAVE)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert not (out / "last.json").exists() and (out / "metrics.jsonl").exists()
    assert list(out.glob(".*.tmp"))  # the half-written file
    assert train.main(["--resume", str(out)]) == 0
    assert not list(out.glob(".*.tmp"))
    assert_same_weights(out / "last.npz", one_go / "last.npz")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_is_exact(tmp_path, corpus_bytes):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(corpus_bytes)
    # Steps of about 0.1-0.5 s, so that each kill lands in the middle of the run.
    argv = [*TINY_RUN, "--block-size", "128", "--batch-size", "32", "--data", str(corpus), "--steps", "16",
            "--save-every", "3", "--log-every", "1", "--eval-every", "0"]
    out, reference = tmp_path / "run", tmp_path / "one_go"
    assert train.main([*argv, "--out", str(reference)]) == 0
    for kill_after in (2, 8):
        proc = start_training([*argv, "--out", str(out)] if kill_after == 2 else ["--resume", str(out)])
        deadline = time.time() + 120
        while last_logged_step(out) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        assert last_logged_step(out) < 16
    assert train.main(["--resume", str(out)]) == 0
    assert_same_weights(out / "last.npz", reference / "last.npz")


def test_non_finite_weights_are_never_saved(tmp_path, corpus_file, monkeypatch, capsys):
    """The loss of a step is computed before its update: a finite loss can still leave NaN weights behind."""
    out = tmp_path / "run"
    monkeypatch.setattr(train, "make_optimizer", lambda *args: optim.SGD(learning_rate=float("inf")))
    assert train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "3",
                       "--save-every", "1"]) == 2
    assert capsys.readouterr().err.endswith(
        "error: the weights became NaN or Inf by step 1; stopped, no checkpoint was saved\n")
    assert not (out / "last.npz").exists() and not list(out.glob("step_*"))


def test_huge_learning_rate_leaves_only_finite_checkpoints(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "6", "--save-every", "1",
                       "--log-every", "1", "--lr", "1e38"]) == 2
    err = capsys.readouterr().err
    assert "stopped, " in err
    for path in out.glob("*.npz"):
        if not path.name.endswith("optimizer.npz"):
            assert all(np.isfinite(w).all() for w in weights(path).values()), path


def test_out_that_can_never_be_a_folder(tmp_path, corpus_file, capsys):
    (tmp_path / "file").write_text("precious")
    for out, message in [("/dev/null/x", "/dev/null/x is under /dev/null, which is a file; --out needs a folder"),
                         (str(tmp_path / "file"), f"{tmp_path / 'file'} is a file; --out needs a folder")]:
        assert train.main([*TINY_RUN, "--data", str(corpus_file), "--out", out]) == 2
        assert capsys.readouterr().err == f"bdh-mlx train: error: {message}\n"
    assert (tmp_path / "file").read_text() == "precious"


def test_cache_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "texts" / name).write_text("some text to learn from. " * 100)
    code = train.main([*TINY_RUN, "--data", str(tmp_path / "texts"), "--out", str(tmp_path / "run"),
                       "--cache-dir", "/dev/null/cache"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1] == "bdh-mlx train: error: /dev/null/cache: Not a directory"
    assert not any("Traceback" in line for line in err)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_cleanly_and_resumes_once_space_is_free(small_disk, tmp_path, corpus_file, capsys):
    out = small_disk / "run"
    argv = [*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "40", "--save-every", "1",
            "--eval-every", "0", "--log-every", "1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("bdh-mlx train: error: ") and "No space left on device" in err
    state = json.loads((out / "last.json").read_text())
    read_checkpoint(out / state["model"])  # the resume point it names is complete
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert train.main(["--resume", str(out)]) == 0
    assert json.loads((out / "last.json").read_text())["step"] == 40
    assert not list(out.glob(".*.tmp"))


def test_read_only_run_folder_is_one_line(small_disk, corpus_file, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert train.main([*TINY_RUN, "--data", str(corpus_file), "--out", str(small_disk / "run")]) == 2
    assert capsys.readouterr().err == f"bdh-mlx train: error: {small_disk}: not writable; choose another --out\n"


def test_a_run_folder_belongs_to_one_process(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    first = start_training([*TINY_RUN, "--data", str(corpus_file), "--out", str(out), "--steps", "100000",
                            "--eval-every", "0", "--save-every", "0"])
    try:
        deadline = time.time() + 120
        while last_logged_step(out) < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert train.main(["--resume", str(out), "--steps", "2"]) == 2  # without the lock: 2 quick steps, exit 0
        assert capsys.readouterr().err == (f"bdh-mlx train: error: {out} is in use by another training process "
                                           f"(pid {first.pid})\n")
    finally:
        first.kill()
        first.wait()
    # kill -9 released the lock, but the run never saved: it starts over with its own options
    assert train.main(["--resume", str(out), "--steps", "2"]) == 0


def read_lines(stream, lines):
    for line in iter(stream.readline, ""):
        lines.put(line)


def wait_for(lines, text, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.time(), 0.01))
        except queue.Empty:
            break
        if text in line:
            return time.time()
    raise AssertionError(f"no line with {text!r} within {timeout} s")


@pytest.mark.slow
def test_ctrl_c_is_answered_during_a_long_step_and_a_second_one_aborts(tmp_path, corpus_file):
    out = tmp_path / "run"
    proc = start_training(["--preset", "small", "--batch-size", "16", "--block-size", "512", "--data",
                           str(corpus_file), "--out", str(out), "--steps", "5", "--no-progress"],
                          stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    wait_for(lines, "starting", 120)
    time.sleep(1.0)  # inside the first (long) step
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    assert wait_for(lines, "Ctrl-C: finishing this step, then saving", 2) - sent < 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130
    assert not (out / "last.npz").exists()
