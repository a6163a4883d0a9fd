"""Gives MLX the fast BLAS of ``bdh_mlx/blas.py`` in every Python process on Linux, even one that imports
``mlx.core`` before ``bdh_mlx`` (mlx-lm's ``generate``, ``chat`` and ``server`` with a bdh-mlx model).

``bdh_mlx_blas.pth``, installed with bdh-mlx (a wheel or ``pip install -e``: see ``setup.py``), imports this
module at interpreter start. It only puts a finder first in ``sys.meta_path``; at the first ``import mlx.core``
the finder loads ``bdh_mlx/blas.py`` by its path (importing ``bdh_mlx`` would import MLX) and calls
``preload()``, which loads the OpenBLAS of the ``cpu`` extra if it is installed and otherwise does nothing,
silently. Then the import goes on as usual. ``BDH_MLX_BLAS=0`` turns it off.
"""

import os
import sys


class LoadBlasBeforeMlx:
    """A meta path finder that finds nothing: it runs ``blas.preload()`` once, when ``mlx.core`` is looked for."""

    done = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "mlx.core" and not cls.done:
            cls.done = True
            preload()
        return None


def preload():
    """``bdh_mlx.blas.preload()`` without importing the ``bdh_mlx`` package; never raises."""
    import importlib.util

    try:
        package = importlib.util.find_spec("bdh_mlx")
        location = os.path.join(package.submodule_search_locations[0], "blas.py")
        spec = importlib.util.spec_from_file_location("_bdh_mlx_blas_preload", location)
        blas = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(blas)
        blas.preload()
    except Exception:  # bdh-mlx uninstalled, or broken: MLX keeps its own BLAS, as without the hook
        pass


if sys.platform == "linux" and os.environ.get("BDH_MLX_BLAS", "1") != "0" and "mlx.core" not in sys.modules:
    sys.meta_path.insert(0, LoadBlasBeforeMlx)
