"""bdh-mlx: the Baby Dragon Hatchling language model for Apple's MLX."""

from . import blas

blas.load()  # first: a BLAS must be loaded before mlx.core to be used by it (Linux CPU; see blas.py)

from .cache import BDHCache
from .checkpoint import load, save
from .errors import BDHError, CheckpointError, ConfigError, DataError
from .generate import batch_generate, generate, generate_step, stream_generate
from .merge import merge
from .model import BDH, PRESETS, BDHConfig
from .quantize import quantize
from .sample_utils import make_logits_processors, make_sampler
from .template import apply_template, end_of_response

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
