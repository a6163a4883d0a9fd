"""The fast BLAS hook (bdh_mlx/blas.py) and ``bdh-mlx info``.

Each case runs in a fresh interpreter, since what MLX binds to depends on what was loaded before ``mlx.core``.
The dynamic linker itself (``LD_DEBUG=bindings``) says which library MLX's ``cblas_sgemm`` call went to.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bdh_mlx import blas

linux_with_wheel = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the cpu extra's OpenBLAS wheel is for Linux x86-64 and aarch64",
)
MATMUL = ("import numpy as np, mlx.core as mx\n"
          "a = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)\n"
          "error = np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a.astype(np.float64) @ a.T.astype(np.float64))\n"
          "print('max error', error.max())\n")
WARNING_TAIL = f"; set {blas.OPT_OUT}=0 to silence this"
WITHOUT_FAISS = ("from importlib import metadata\n"
                 "def distribution(name, real=metadata.distribution):\n"
                 "    if name == 'faiss-cpu':\n"
                 "        raise metadata.PackageNotFoundError(name)\n"
                 "    return real(name)\n"
                 "metadata.distribution = distribution\n")  # faiss-cpu looks uninstalled


def run_python(code, bindings=False, **env):
    """(stdout, stderr, the library MLX's cblas_sgemm was bound to) of ``code`` in a fresh interpreter."""
    environ = {**os.environ, **env, **({"LD_DEBUG": "bindings"} if bindings else {})}
    for name in ("LD_PRELOAD", blas.OPT_OUT, "OMP_WAIT_POLICY"):
        if name not in env:
            environ.pop(name, None)
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=environ,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bound = re.findall(r"binding file \S+/libmlx\.so \[0\] to (\S+) \[0\]: normal symbol `cblas_sgemm'", done.stderr)
    stderr = "\n".join(line for line in done.stderr.splitlines() if not re.match(r"\s*\d+:", line))  # no LD_DEBUG
    return done.stdout, stderr, bound[0] if bound else None


def assert_exact_matmul(stdout):
    error = float(re.search(r"max error (\S+)", stdout).group(1))
    assert error < 1e-3  # float32 sums of 48 products of N(0,1) numbers, against float64


@linux_with_wheel
def test_finder_returns_the_wheels_openblas_and_its_dependencies():
    paths = blas.find_openblas()
    site = metadata.distribution(blas.PROVIDER).locate_file("")
    assert paths[-1].name.startswith("libopenblas")
    assert [p.name.split("-")[0] for p in paths[:-1]] == (
        ["libquadmath", "libgfortran", "libgomp"] if platform.machine() == "x86_64" else ["libgfortran", "libgomp"])
    for path in paths:
        assert path.is_file() and path.parent == site / blas.LIBS_DIR


@linux_with_wheel
def test_importing_bdh_mlx_binds_mlx_matmul_to_the_openblas():
    stdout, stderr, bound = run_python("import bdh_mlx\n" + MATMUL, bindings=True)
    assert os.path.realpath(bound) == os.path.realpath(blas.find_openblas()[-1])
    assert "bdh_mlx" not in stderr  # no warning
    assert_exact_matmul(stdout)


@linux_with_wheel
def test_openmp_threads_sleep_between_matmuls_unless_the_user_chose():
    code = "import os, bdh_mlx\nprint(os.environ['OMP_WAIT_POLICY'])"
    assert run_python(code)[0] == "PASSIVE\n"
    assert run_python(code, OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE\n"


@linux_with_wheel
def test_opt_out_keeps_mlx_reference_blas_silently():
    stdout, stderr, bound = run_python("import bdh_mlx\n" + MATMUL, bindings=True, BDH_MLX_BLAS="0")
    assert "mlx_cpu.libs/libblas" in bound
    assert "bdh_mlx" not in stderr
    assert_exact_matmul(stdout)


@linux_with_wheel
def test_mlx_imported_first_warns_once_and_still_works():
    """Without the import hook (taken out of ``sys.meta_path`` here), as in an install without bdh_mlx_blas.pth."""
    code = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if getattr(f, '__name__', '') != "
            "'LoadBlasBeforeMlx']\nimport mlx.core\nimport bdh_mlx\nbdh_mlx.blas.load()\n" + MATMUL)
    stdout, stderr, bound = run_python(code, bindings=True)
    message = ("RuntimeWarning: bdh_mlx: mlx.core was imported before bdh_mlx, so MLX keeps its slow reference BLAS: "
               "import bdh_mlx first" + WARNING_TAIL)
    assert stderr.count(message) == 1 and stderr.count("RuntimeWarning") == 1
    assert "mlx_cpu.libs/libblas" in bound
    assert_exact_matmul(stdout)


@linux_with_wheel
def test_missing_wheel_warns_and_import_still_works():
    code = (WITHOUT_FAISS
            + "import bdh_mlx\n" + MATMUL)
    stdout, stderr, _ = run_python(code)
    assert ("bdh_mlx: faiss-cpu is not installed, so MLX keeps its slow reference BLAS: pip install 'bdh-mlx[cpu]'"
            + WARNING_TAIL) in stderr
    assert_exact_matmul(stdout)


@linux_with_wheel
def test_unloadable_library_warns_and_import_still_works():
    code = ("import ctypes\n"
            "class Refuse(ctypes.CDLL):\n"
            "    def __init__(self, name, *args, **kwargs):\n"
            "        if name and 'libopenblas' in name:\n"
            "            raise OSError('refused for the test')\n"
            "        super().__init__(name, *args, **kwargs)\n"
            "ctypes.CDLL = Refuse\n"
            "import bdh_mlx\n" + MATMUL)
    stdout, stderr, _ = run_python(code)
    assert re.search(r"bdh_mlx: could not load \S+/libopenblas\S+ \(refused for the test\), so MLX keeps its slow "
                     r"reference BLAS; set BDH_MLX_BLAS=0", stderr)
    assert_exact_matmul(stdout)


def test_info_prints_every_field():
    done = subprocess.run([sys.executable, "-m", "bdh_mlx", "info", "--size", "64", "--seconds", "0.01"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fields = dict(re.match(r"([^:]+):\s+(.*)", line).groups() for line in done.stdout.splitlines())
    assert list(fields) == ["bdh-mlx", "mlx", "device", "platform", "python", "blas",
                            "matmul 64x64 float32, mlx", "matmul 64x64 float32, numpy"]
    import mlx.core as mx

    import bdh_mlx

    assert fields["bdh-mlx"] == bdh_mlx.__version__ and fields["mlx"] == mx.__version__
    assert fields["python"] == platform.python_version()
    assert re.fullmatch(r"[\d,]+\.\d GFLOP/s on Device\((cpu|gpu), 0\)", fields["matmul 64x64 float32, mlx"])
    assert re.fullmatch(r"[\d,]+\.\d GFLOP/s", fields["matmul 64x64 float32, numpy"])
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
        assert fields["blas"].startswith("OpenBLAS ")
        assert fields["blas"].endswith(": " + os.path.realpath(blas.find_openblas()[-1]))


def test_info_rejects_a_bad_size():
    done = subprocess.run([sys.executable, "-m", "bdh_mlx", "info", "--size", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "bdh-mlx info: error: argument --size: must be a positive integer, got 0\n"


PTH = Path(__file__).parent.parent / "bdh_mlx_blas.pth"


@linux_with_wheel
@pytest.mark.parametrize("opt_out", [False, True])
def test_the_pth_hook_loads_the_openblas_before_mlx_imported_first(tmp_path, opt_out):
    """As in mlx-lm's processes: ``mlx.core`` first, bdh_mlx later; the .pth, read at start up, loaded the BLAS."""
    shutil.copy(PTH, tmp_path)
    code = f"import site\nsite.addsitedir({str(tmp_path)!r})\nimport mlx.core\nimport bdh_mlx\n" + MATMUL
    stdout, stderr, bound = run_python(code, bindings=True, **({blas.OPT_OUT: "0"} if opt_out else {}))
    if opt_out:
        assert "mlx_cpu.libs/libblas" in bound
    else:
        assert os.path.realpath(bound) == os.path.realpath(blas.find_openblas()[-1])
    assert "bdh_mlx" not in stderr  # no warning
    assert_exact_matmul(stdout)


def test_the_pth_hook_is_silent_without_the_cpu_extra(tmp_path):
    """Without faiss-cpu, any process that imports MLX stays as it was: no warning, MLX's own BLAS."""
    shutil.copy(PTH, tmp_path)
    code = (WITHOUT_FAISS
            + f"import site\nsite.addsitedir({str(tmp_path)!r})\n" + MATMUL)
    stdout, stderr, bound = run_python(code, bindings=True)
    assert bound is None or "openblas" not in bound
    assert "bdh_mlx" not in stderr
    assert_exact_matmul(stdout)


@linux_with_wheel
def test_the_installed_hook_gives_mlx_imported_first_the_openblas():
    """As pip installs bdh-mlx (a wheel or -e, as CI does): mlx-lm's order, mlx.core first, gets the OpenBLAS."""
    import site

    if not any((Path(folder) / "bdh_mlx_blas.pth").exists() for folder in site.getsitepackages()):
        pytest.skip("bdh-mlx is not pip-installed in this interpreter (no bdh_mlx_blas.pth)")
    stdout, stderr, bound = run_python("import mlx.core\n" + MATMUL, bindings=True)
    assert bound is not None and "libopenblas" in bound
    assert "RuntimeWarning" not in stderr
    assert_exact_matmul(stdout)
