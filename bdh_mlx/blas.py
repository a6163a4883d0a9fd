"""A fast BLAS for MLX's CPU backend on Linux, with no extra step: loaded before the first ``import mlx.core``.

The stock ``mlx[cpu]`` wheel links the reference BLAS (a few GFLOP/s). A library that exports ``cblas_sgemm``,
loaded with ``RTLD_GLOBAL`` *before* MLX is loaded, comes first in the dynamic linker's global scope, so MLX's
calls bind to it (loading it later does nothing). The ``cpu`` extra installs ``faiss-cpu``, whose manylinux wheel
bundles a multi-threaded OpenBLAS (DYNAMIC_ARCH, unprefixed symbols) together with its own libgfortran and
libgomp: nothing is needed from the system. ``bdh_mlx/__init__.py`` calls :func:`load` first thing; in processes
that import ``mlx.core`` before ``bdh_mlx`` (mlx-lm's, with a bdh-mlx model), the import hook
``bdh_mlx_blas_hook`` (installed with the package as ``bdh_mlx_blas.pth``) calls :func:`preload` just before.

``BDH_MLX_BLAS=0`` turns this off. Unless set already, ``OMP_WAIT_POLICY`` is set to ``PASSIVE``: OpenMP threads
that spin between MLX's many small matmuls take the cores MLX's own work needs (measured on 2 busy cores: the
small preset's training step went from 57 to 308 tokens/s).
"""

import ctypes
import functools
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

OPT_OUT = "BDH_MLX_BLAS"
PROVIDER = "faiss-cpu"  # the distribution whose wheel bundles the OpenBLAS
LIBS_DIR = "faiss_cpu.libs"
# The OpenBLAS's own dependencies, in the order they must be loaded (libgfortran needs libquadmath on x86-64).
DEPENDENCY_PREFIXES = ("libquadmath", "libgfortran", "libgomp")


def find_openblas():
    """Paths to load, dependencies first and the OpenBLAS last, from the installed provider; None if absent."""
    try:
        dist = metadata.distribution(PROVIDER)
    except metadata.PackageNotFoundError:
        return None
    libs = {Path(f).name: Path(dist.locate_file(f)) for f in dist.files or []
            if Path(f).parent.name == LIBS_DIR and ".so" in Path(f).name}
    blas = sorted(name for name in libs if name.startswith("libopenblas"))
    if not blas:
        return None
    dependencies = [libs[name] for prefix in DEPENDENCY_PREFIXES for name in sorted(libs) if name.startswith(prefix)]
    return [*dependencies, libs[blas[0]]]


def global_cblas():
    """Path of the library that provides ``cblas_sgemm`` in the global scope (what MLX binds to), or None."""
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    if not process.dladdr(address, ctypes.byref(info)):
        return None
    return os.path.realpath(info.fname.decode())


def mlx_cpu_installed() -> bool:
    try:
        metadata.distribution("mlx-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


@functools.cache
def load():
    """Load the bundled OpenBLAS globally before MLX; returns the BLAS path MLX will use, or None.

    Runs once and never raises: when it cannot help (MLX already imported, library missing or unloadable) it warns.
    Does nothing off Linux (macOS has Accelerate), with ``BDH_MLX_BLAS=0``, or when a BLAS is already global
    (e.g. ``LD_PRELOAD``, or ``bdh_mlx_blas_hook`` before any ``import mlx.core``).
    """
    return _load(warn)


def preload():
    """``load`` for the import hook (``bdh_mlx_blas_hook``), in any process that imports MLX: silent, and
    nothing at all when the ``cpu`` extra is not installed."""
    return _load(lambda message: None)


def _load(warn):
    if sys.platform != "linux" or os.environ.get(OPT_OUT, "1") == "0":
        return None
    already = global_cblas()
    if already:
        return already
    paths = find_openblas()
    if paths is None:
        if mlx_cpu_installed():
            warn(f"{PROVIDER} is not installed, so MLX keeps its slow reference BLAS: pip install 'bdh-mlx[cpu]'")
        return None
    if "mlx.core" in sys.modules:
        warn("mlx.core was imported before bdh_mlx, so MLX keeps its slow reference BLAS: import bdh_mlx first")
        return None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when it is loaded, just below
    try:
        for path in paths[:-1]:
            ctypes.CDLL(str(path))  # local: only the OpenBLAS's own symbols go global
        ctypes.CDLL(str(paths[-1]), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        warn(f"could not load {paths[-1]} ({e}), so MLX keeps its slow reference BLAS")
        return None
    return os.path.realpath(paths[-1])


def warn(message):
    warnings.warn(f"bdh_mlx: {message}; set {OPT_OUT}=0 to silence this", RuntimeWarning, stacklevel=4)
