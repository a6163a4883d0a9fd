"""Decoding speed inside mlx-lm against bdh-mlx's own, on the same model, and mlx-lm's server under load.

    python benchmarks/mlx_lm_speed.py [--preset small | --checkpoint CKPT] [--tokens 256] [--repeats 3]

1. ``mlx_lm.stream_generate`` (the exported folder, loaded by ``mlx_lm.load`` with ``trust_remote_code``) against
   ``bdh_mlx.stream_generate``: generation tokens/s as each reports it, greedy, the same prompt; the two run in
   turns (ABBA), ``--repeats`` times each, and the medians are printed with their ratio.
2. ``mlx_lm.server`` on a free loopback port: the aggregate tokens/s (completion tokens of all requests over
   the wall time) of 1 client, then of 4 concurrent clients, each asking for ``--tokens`` tokens.

The server is started through ``bdh_mlx_blas_hook`` (what the installed ``bdh_mlx_blas.pth`` does), so that on
Linux CPU its MLX gets the fast BLAS as an installed bdh-mlx gives it.
"""

import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bdh_mlx  # noqa: F401  first: on Linux it gives MLX the fast BLAS before mlx.core is imported

# isort: split
import mlx.core as mx
import mlx_lm

from bdh_mlx import BDH, BDHConfig, load, save, stream_generate
from bdh_mlx.storage.convert import export

PROMPT = "The Baby Dragon Hatchling reads bytes, one at a time, and "
SERVER_START_SECONDS = 300


def last(responses):
    """The last of a stream of responses (the one with the whole generation's speed)."""
    return collections.deque(responses, maxlen=1).pop()


def decoding_speeds(folder: Path, checkpoint: Path, tokens: int, repeats: int) -> tuple:
    """Generation tokens/s of each run of bdh-mlx and of mlx-lm, run in turns."""
    model = load(checkpoint)
    mlx_model, tokenizer = mlx_lm.load(str(folder), trust_remote_code=True)
    runs = {"ours": lambda: stream_generate(model, PROMPT, max_tokens=tokens),
            "theirs": lambda: mlx_lm.stream_generate(mlx_model, tokenizer, PROMPT, max_tokens=tokens)}
    speeds = {name: [] for name in runs}
    for i in range(repeats):
        for name in sorted(runs, reverse=i % 2 == 1):  # ABBA: neither side always goes first
            speeds[name].append(last(runs[name]()).generation_tps)
    return speeds["ours"], speeds["theirs"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    code = "import bdh_mlx_blas_hook, runpy; runpy.run_module('mlx_lm.server', run_name='__main__')"
    command = [sys.executable, "-c", code, "--model", str(folder), "--trust-remote-code", "--host", "127.0.0.1",
               "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                sys.exit(f"mlx_lm.server did not start (exit code {process.poll()})")
            time.sleep(0.5)


def complete(port: int, tokens: int) -> int:
    """One greedy completion of ``tokens`` tokens; the completion tokens the server reports."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]


def server_throughput(folder: Path, tokens: int, clients: list) -> dict:
    """Aggregate completion tokens/s of the server for each number of concurrent clients."""
    port = free_port()
    process = start_server(folder, port)
    try:
        complete(port, 8)  # warm up
        speeds = {}
        for n in clients:
            tic = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                done = sum(pool.map(lambda _: complete(port, tokens), range(n)))
            speeds[n] = done / (time.perf_counter() - tic)
        return speeds
    finally:
        process.kill()
        process.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="a random model of this preset (without --checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint to measure instead")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (medians)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent server clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint or Path(tmp) / "model.npz")
        if args.checkpoint is None:
            mx.random.seed(0)
            save(BDH(BDHConfig.from_preset(args.preset)), checkpoint)
        folder = Path(tmp) / "mlx-lm"
        config, _ = export(checkpoint, folder)
        ours, theirs = decoding_speeds(folder, checkpoint, args.tokens, args.repeats)
        print(f"model: {args.checkpoint or 'random ' + args.preset}, {config.num_parameters:,} parameters; "
              f"{args.tokens} tokens, greedy; device {mx.default_device()}")
        print(f"{'':<28}{'tokens/s':>10}   (median; range of {args.repeats} runs)", flush=True)
        for name, runs in (("bdh-mlx stream_generate", ours), ("mlx_lm.stream_generate", theirs)):
            print(f"{name:<28}{statistics.median(runs):>10.1f}   ({min(runs):.1f} - {max(runs):.1f})", flush=True)
        ratio = statistics.median(theirs) / statistics.median(ours)
        print(f"mlx-lm / bdh-mlx: {ratio:.2f} (medians)", flush=True)
        speeds = server_throughput(folder, args.tokens, args.clients)
        for n, speed in speeds.items():
            name = f"mlx_lm.server, {n} client" + ("s" if n > 1 else "")
            print(f"{name:<28}{speed:>10.1f}   (aggregate)", flush=True)


if __name__ == "__main__":
    main()
