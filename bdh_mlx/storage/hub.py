"""Checkpoints on the Hugging Face Hub: ``org/name`` or ``org/name@revision`` wherever a checkpoint path goes.

A model repo holds ``model.npz`` (the bdh-mlx checkpoint), ``config.json`` and a ``README.md`` model card.
Downloads go through ``huggingface_hub.snapshot_download`` into the standard Hugging Face cache, so
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` work as everywhere else.
"""

import contextlib
from pathlib import Path

from bdh_mlx.errors import CheckpointError

MODEL_FILE = "model.npz"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
SAFETENSORS_FILE = "model.safetensors"  # an mlx-lm model folder (storage/mlx_lm.py): read in place of model.npz
REPO_FILES = (MODEL_FILE, CONFIG_FILE, CARD_FILE, SAFETENSORS_FILE, "tokenizer.json")

TOKEN_HINT = "set HF_TOKEN or run `hf auth login`"


class HubError(CheckpointError):
    """A Hub repo that cannot be reached, found, read or written."""


def looks_like_path(spec: str) -> bool:
    """True for what can only be a local path: it exists, ends in ``.npz``, or starts with ``.``, ``/`` or ``~``."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.endswith(".npz")


def parse_repo_id(spec: str):
    """``(repo_id, revision)`` for ``org/name`` or ``org/name@revision``; None if ``spec`` is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or (spec.count("@") and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve_checkpoint(spec) -> Path:
    """The local ``.npz`` for a checkpoint path or a Hub repo id (downloaded and cached); a local path wins.

    A folder stands for the ``model.npz`` inside it (e.g. a repo downloaded with ``--local-dir``), or else for
    itself (an mlx-lm model folder).
    Anything that is neither an existing path nor a repo id comes back as a path, for the reader's error.
    """
    if isinstance(spec, Path) or looks_like_path(str(spec)):
        path = Path(spec).expanduser()
        return path / MODEL_FILE if (path / MODEL_FILE).is_file() else path
    parsed = parse_repo_id(str(spec))
    if parsed is None:
        return Path(spec)
    return download(*parsed)


def download(repo_id: str, revision=None) -> Path:
    """``model.npz`` of a Hub model repo, from the cache or downloaded (with ``config.json`` and ``README.md``);
    the repo's folder when it holds an mlx-lm model folder instead (``model.safetensors``; no ``.py`` is fetched)."""
    import huggingface_hub

    with hub_errors(repo_id, revision, missing="no such local file, and no such Hub repo"):
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(REPO_FILES))
    path = Path(folder) / MODEL_FILE
    if not path.is_file() and (Path(folder) / SAFETENSORS_FILE).is_file():
        return Path(folder)
    if not path.is_file():
        at = f" at revision {revision!r}" if revision else ""
        raise HubError(f"{repo_id}: the Hub repo has no {MODEL_FILE}{at}; it is not a bdh-mlx model")
    return path


@contextlib.contextmanager
def hub_errors(repo_id: str, revision=None, missing: str = "no such Hub repo"):
    """Turn huggingface_hub's exceptions (multi-line, with URLs) into one-line HubErrors naming ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubError(f"{repo_id}: a gated repo; accept its conditions on the Hub, then {TOKEN_HINT}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: {missing} (if it is private, {TOKEN_HINT})") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} on the Hub") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                           f"HF_HUB_OFFLINE is set; download it once online") from None
        raise HubError(f"{repo_id}: cannot reach the Hub at {constants.ENDPOINT} ({summary(e.__cause__ or e)}) "
                       f"and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE})") from None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise HubError(f"{repo_id}: the Hub refused access (401); {TOKEN_HINT}") from None
        raise HubError(f"{repo_id}: Hub request failed: {summary(e)}") from None


def summary(error: Exception) -> str:
    """huggingface_hub's message on one line (its first two lines hold the status and the URL)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
