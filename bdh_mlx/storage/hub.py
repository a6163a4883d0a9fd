"""Checkpoints on the Hugging Face Hub: ``org/name`` or ``org/name@revision`` wherever a checkpoint path goes.

A model repo holds ``model.npz`` (the bdh-mlx checkpoint), ``config.json`` and a ``README.md`` model card.
Downloads go through ``huggingface_hub.snapshot_download`` into the standard Hugging Face cache, so
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` work as everywhere else.

Every Hub call is bounded (``bounded_network``): huggingface_hub's shared client waits forever by default.
Each request waits at most ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds for a byte, and no request starts once the
Hub has not answered for ``BDH_HUB_TIMEOUT`` seconds (default 30), so retries end too.
"""

import contextlib
import logging
import math
import os
import time
from pathlib import Path

from bdh_mlx.errors import CheckpointError

MODEL_FILE = "model.npz"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
SAFETENSORS_FILE = "model.safetensors"  # an mlx-lm model folder (storage/mlx_lm.py): read in place of model.npz
REPO_FILES = (MODEL_FILE, CONFIG_FILE, CARD_FILE, SAFETENSORS_FILE, "tokenizer.json")

TOKEN_HINT = "set HF_TOKEN or run `hf auth login`"
PATIENCE_VARIABLE = "BDH_HUB_TIMEOUT"
DEFAULT_PATIENCE = 30.0
SUMMARY_CHARS = 300  # of an error message from elsewhere
QUIET_LOGGERS = ("huggingface_hub", "datasets", "fsspec")  # retry warnings alone would be a dozen lines


class HubError(CheckpointError):
    """A Hub repo that cannot be reached, found, read or written."""


class HubSilent(HubError):
    """The Hub has not answered for ``BDH_HUB_TIMEOUT`` seconds."""


def hub_patience() -> float:
    """Seconds without an answer from the Hub before a call gives up: ``BDH_HUB_TIMEOUT``, default 30."""
    text = os.environ.get(PATIENCE_VARIABLE, "")
    if not text:
        return DEFAULT_PATIENCE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise HubError(f"{PATIENCE_VARIABLE} must be a positive number of seconds, got {text!r}")
    return value


class _Watch:
    """When the Hub last answered (a response, or a chunk of one), shared by every thread of a call; the hooks
    act only inside ``bounded_network`` (``active``), so other uses of huggingface_hub are left as they are."""

    last_answer = 0.0
    patience = DEFAULT_PATIENCE
    active = 0

    @classmethod
    def answered(cls):
        cls.last_answer = time.monotonic()

    @classmethod
    def before_request(cls, request):
        """An httpx request hook: refuse once the Hub has been silent too long, else bound the wait for a byte."""
        from huggingface_hub import constants

        if not cls.active:
            return
        remaining = cls.patience - (time.monotonic() - cls.last_answer)
        if remaining <= 0:
            raise HubSilent(f"no answer from {request.url.scheme}://{request.url.netloc.decode()} for "
                            f"{cls.patience:g} s ({PATIENCE_VARIABLE})")
        wait = min(constants.HF_HUB_DOWNLOAD_TIMEOUT, remaining)
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            kind: min(given.get(kind) or wait, wait) for kind in ("connect", "read", "write", "pool")
        }

    @classmethod
    def on_response(cls, response):
        """An httpx response hook: an answer, and every chunk of its body, counts as the Hub answering."""
        import httpx2

        if not cls.active:
            return

        class Answering(httpx2.SyncByteStream):
            def __init__(self, stream):
                self.stream = stream

            def __iter__(self):
                for chunk in self.stream:
                    cls.answered()
                    yield chunk

            def close(self):
                self.stream.close()

        cls.answered()
        response.stream = Answering(response.stream)


def _bound_client_factory():
    """Make huggingface_hub build its shared client (again after each connection error) with ``_Watch``'s hooks."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    make_client = _http._GLOBAL_CLIENT_FACTORY  # the default, or one a user set
    if getattr(make_client, "bounded", False):
        return

    def bounded_client():
        client = make_client()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks["request"], _Watch.before_request],
                              "response": [*hooks["response"], _Watch.on_response]}
        return client

    bounded_client.bounded = True
    huggingface_hub.set_client_factory(bounded_client)


@contextlib.contextmanager
def quiet_logs():
    """huggingface_hub's, datasets' and fsspec's log lines silenced: what fails is raised, and told in one line."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def bounded_network():
    """Hub calls inside end in bounded time (see the module docstring), with their retry warnings silenced."""
    _bound_client_factory()
    _Watch.patience = hub_patience()
    _Watch.answered()
    _Watch.active += 1
    try:
        with quiet_logs():
            yield
    finally:
        _Watch.active -= 1


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
    """Turn huggingface_hub's exceptions (multi-line, with URLs) into one-line HubErrors naming ``repo_id``;
    the calls inside are bounded in time (``bounded_network``)."""
    import httpx2
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
        with bounded_network():
            yield
    except HubError:
        raise
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
    except httpx2.HTTPError as e:  # a network failure outside huggingface_hub's own handling
        raise HubError(f"{repo_id}: cannot reach the Hub at {constants.ENDPOINT} ({summary(e)})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # an answer that is not the Hub's API
        raise HubError(f"{repo_id}: the Hub at {constants.ENDPOINT} answered something unexpected "
                       f"({type(e).__name__}: {summary(e)})") from None


def summary(error: Exception) -> str:
    """huggingface_hub's message on one line (its first two lines hold the status and the URL)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(error).__name__
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."
