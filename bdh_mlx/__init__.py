"""bdh-mlx: the Baby Dragon Hatchling language model for Apple's MLX."""

from .cache import BDHCache
from .checkpoint import load, save
from .errors import BDHError, CheckpointError, ConfigError, DataError
from .model import BDH, PRESETS, BDHConfig
from .quantize import quantize

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
    "load",
    "quantize",
    "save",
]
