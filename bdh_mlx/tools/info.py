"""``bdh-mlx info``: versions, device, the BLAS that MLX's CPU backend uses, and its measured matmul speed."""

import ctypes
import os
import platform
import sys
import time

import mlx.core as mx
import numpy as np

from bdh_mlx import __version__, blas
from bdh_mlx.arguments import ArgumentParser, number_in, positive_int, run_command

REFERENCE_BLAS = "mlx_cpu.libs/libblas"  # the reference BLAS that the stock mlx[cpu] wheel links


def mapped_libraries() -> list:
    """Paths of the shared libraries mapped into this process (Linux)."""
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if ".so" in line})


def blas_description() -> str:
    """Which BLAS MLX's CPU matmuls go to, with the library's path where there is one."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if sys.platform != "linux":
        return "unknown"
    path = blas.global_cblas()
    if path:
        return f"{openblas_config(path) or 'loaded'}: {path}"
    reference = [p for p in mapped_libraries() if REFERENCE_BLAS in p]
    why = (f"turned off by {blas.OPT_OUT}=0" if os.environ.get(blas.OPT_OUT) == "0"
           else "pip install 'bdh-mlx[cpu]' and import bdh_mlx before mlx for a fast one")
    return f"reference BLAS, slow ({why}): {reference[0] if reference else 'not mapped'}"


def openblas_config(path):
    """OpenBLAS's own description of its build and the CPU kernels it chose, or None for another library."""
    library = ctypes.CDLL(path)
    if not hasattr(library, "openblas_get_config"):
        return None
    library.openblas_get_config.restype = library.openblas_get_corename.restype = ctypes.c_char_p
    return f"{library.openblas_get_config().decode()} (kernels: {library.openblas_get_corename().decode()})"


def matmul_gflops(matmul, a, b, seconds) -> float:
    """Best GFLOP/s of ``matmul(a, b)`` over repeats lasting about ``seconds`` (after one warm-up)."""
    n = a.shape[0]
    matmul(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        matmul(a, b)
        now = time.perf_counter()
        best = min(best, now - start)
        if now >= deadline:
            return 2 * n**3 / best / 1e9


def report(size, seconds) -> list:
    """(name, value) rows of ``bdh-mlx info``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    device = mx.default_device()
    mlx_a, mlx_b = mx.array(a), mx.array(b)
    mlx_rate = matmul_gflops(lambda x, y: mx.eval(x @ y), mlx_a, mlx_b, seconds)
    numpy_rate = matmul_gflops(np.matmul, a, b, seconds)
    return [
        ("bdh-mlx", __version__),
        ("mlx", mx.__version__),
        ("device", str(device)),
        ("platform", f"{platform.platform()} ({platform.machine()})"),
        ("python", platform.python_version()),
        ("blas", blas_description()),
        (f"matmul {size}x{size} float32, mlx", f"{mlx_rate:,.1f} GFLOP/s on {device}"),
        (f"matmul {size}x{size} float32, numpy", f"{numpy_rate:,.1f} GFLOP/s"),
    ]


def build_parser():
    parser = ArgumentParser(prog="bdh-mlx info", description="Print versions, the device, the BLAS MLX uses on the "
                            "CPU and its measured matmul speed (with numpy's for comparison).")
    parser.add_argument("--size", type=positive_int, default=1024, help="matrix size of the timed matmul")
    parser.add_argument("--seconds", type=number_in(0, 60, lo_open=True), default=1.0,
                        help="about how long to time each matmul")
    return parser


def run(args):
    rows = report(args.size, args.seconds)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")


def main(argv=None) -> int:
    return run_command("bdh-mlx info", build_parser().parse_args, run, argv)
