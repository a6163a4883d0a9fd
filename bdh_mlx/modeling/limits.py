"""What a model config may hold: bounds far above any real model, low enough that a crafted config (a
checkpoint from elsewhere) cannot hang or overflow."""

import numpy as np

from bdh_mlx.errors import ConfigError
from bdh_mlx.inference.template import check_template
from bdh_mlx.modeling.quantized import check_quantization

ATTENTION_FORMS = ("auto", "parallel", "chunked")
SIZE_LIMITS = {
    "n_layer": 1024,
    "n_embd": 65536,
    "n_head": 1024,
    "mlp_internal_dim_multiplier": 65536,
    "vocab_size": 2**20,
    "chunk_size": 2**20,
}
MAX_PARAMETERS = 2**34


def _describe_int(value: int) -> str:
    return str(value) if value.bit_length() <= 64 else f"about 2**{int(value).bit_length() - 1}"


def check_config(config):
    """Raise ConfigError unless every field of ``config`` (a BDHConfig) is usable; normalises the numbers."""
    for name, limit in SIZE_LIMITS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if value > limit:
            raise ConfigError(f"{name} must be at most {limit:,}, got {_describe_int(value)}")
        setattr(config, name, int(value))
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    config.dropout = float(config.dropout)
    if config.attention not in ATTENTION_FORMS:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_FORMS)}, got {config.attention!r}")
    if config.n_neurons < 2 or config.n_neurons % 2:
        raise ConfigError(
            f"mlp_internal_dim_multiplier * n_embd // n_head must be even and positive for RoPE, "
            f"got {config.n_neurons}"
        )
    if config.num_parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"the config has {config.num_parameters:,} parameters, more than the {MAX_PARAMETERS:,} (2**34) allowed"
        )
    config.quantization = check_quantization(config.quantization, config.n_embd, config.n_neurons)
    config.prompt_template = check_template(config.prompt_template)
