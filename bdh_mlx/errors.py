"""The package's error types: each one carries a single line a user can act on."""


class BDHError(Exception):
    """Base class of every error that bdh-mlx reports to a user."""


class ConfigError(BDHError, ValueError):
    """An invalid model or run configuration (unknown preset, bad value)."""


class CheckpointError(BDHError):
    """A checkpoint or cache file that is missing, unreadable, foreign or inconsistent."""


class DataError(BDHError):
    """A corpus or dataset that cannot be used for training or evaluation."""
