"""bdh-mlx: the Baby Dragon Hatchling language model for Apple's MLX."""

from bdh_mlx import blas

blas.load()  # first: a BLAS must be loaded before mlx.core to be used by it (Linux CPU; see blas.py)

from bdh_mlx.errors import BDHError, CheckpointError, ConfigError, DataError
from bdh_mlx.inference.engines import choose_engine
from bdh_mlx.inference.generate import batch_generate, generate, generate_step, stream_generate
from bdh_mlx.inference.sample_utils import make_logits_processors, make_sampler
from bdh_mlx.inference.template import apply_template, end_of_response
from bdh_mlx.model import BDH, PRESETS, BDHConfig
from bdh_mlx.modeling.cache import BDHCache
from bdh_mlx.storage.checkpoint import load, save
from bdh_mlx.tools.merge import merge
from bdh_mlx.tools.quantize import quantize

__version__ = "0.1.0"

__all__ = [
    "BDH",
    "BDHCache",
    "BDHConfig",
    "BDHError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "PRESETS",
    "apply_template",
    "batch_generate",
    "choose_engine",
    "end_of_response",
    "generate",
    "generate_step",
    "load",
    "make_logits_processors",
    "make_sampler",
    "merge",
    "quantize",
    "save",
    "stream_generate",
]
