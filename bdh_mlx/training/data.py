"""Byte corpora for training and evaluation: files, folders, globs, Hugging Face datasets, or a built-in default.

One token is one byte. Large corpora are memory-mapped (``np.memmap``), never read whole;
datasets and multi-file corpora are encoded once to a ``.bin`` byte file in a cache folder.
"""

import glob
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bdh_mlx.errors import DataError
from bdh_mlx.storage.files import atomic_write
from bdh_mlx.storage.hub import HubSilent, bounded_network, quiet_logs, summary

VAL_FRACTION = 0.1
GLOB_CHARS = "*?["
DATASET_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv"}
# Files bdh-mlx writes (checkpoints, optimizer states, caches, run records): never training text in a --data folder.
OWN_SUFFIXES = (".npz", ".npy", ".bin", ".json", ".jsonl", ".pt")
SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """Train and validation bytes (uint8 arrays, usually memory-mapped) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str

    def check_block_size(self, block_size: int):
        """Both parts must hold at least one crop of ``block_size + 1`` bytes."""
        need = block_size + 1
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < need:
                raise DataError(
                    f"{self.source}: the {name} part has {len(part)} bytes, fewer than one block of "
                    f"block_size + 1 = {need} bytes; use a smaller --block-size or more data"
                )


def add_data_arguments(parser):
    """The data options shared by ``train`` and ``eval``."""
    group = parser.add_argument_group("data (default: the built-in pydoc_data corpus)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="PATH", help="a text file, a folder of text files, or a glob (raw bytes)")
    source.add_argument("--dataset", metavar="NAME_OR_PATH", help="a Hugging Face dataset: hub name, saved dataset, "
                        "or parquet / JSON lines / text files")
    group.add_argument("--val-data", metavar="PATH", help="validation file/folder/glob (default: last 10%% of --data)")
    group.add_argument("--text-field", help="dataset column holding the text (default: the only string column)")
    group.add_argument("--split", default="train", help="dataset split to read")
    group.add_argument("--val-split", help="dataset split for validation (default: the last 10%% of --split)")
    group.add_argument("--cache-dir", metavar="DIR", help="where encoded byte files are cached "
                       "(default: data_cache/ beside the run folder)")
    return group


def default_cache_dir(run_dir) -> Path:
    """Encoded corpora are cached beside the run folders, so later runs and resumes reuse them."""
    return Path(run_dir).parent / "data_cache"


def default_corpus_bytes() -> bytes:
    """CPython's own documentation text (``pydoc_data.topics``, ~465 KB of English): no download needed."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def memmap_bytes(path) -> np.ndarray:
    """The bytes of ``path`` as a read-only uint8 memory map (an empty array for an empty file)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def is_binary(path: Path) -> bool:
    """A NUL byte in the first ``SNIFF_BYTES``: not text (an array, an image, an archive)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(SNIFF_BYTES)


def folder_files(spec: str, folder: Path) -> list:
    """The text files under ``folder``, sorted: no dotfiles, none of the files bdh-mlx writes, nothing binary.

    Says on stderr how many files (and bytes) were taken and how many were skipped.
    """
    files, skipped = [], {"ours": 0, "binary": 0, "hidden": 0}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            skipped["hidden"] += 1
        elif p.suffix.lower() in OWN_SUFFIXES:
            skipped["ours"] += 1
        elif is_binary(p):
            skipped["binary"] += 1
        else:
            files.append(p)
    reasons = [
        f"{skipped['ours']} {'/'.join(OWN_SUFFIXES)}" if skipped["ours"] else "",
        f"{skipped['binary']} binary" if skipped["binary"] else "",
        f"{skipped['hidden']} hidden" if skipped["hidden"] else "",
    ]
    skipped_text = f"skipped {sum(skipped.values())} ({', '.join(r for r in reasons if r)})" if any(reasons) else ""
    if not files:
        raise DataError(f"{spec}: the folder holds no text files{'; ' + skipped_text if skipped_text else ''}")
    taken = sum(p.stat().st_size for p in files)
    print(f"data: {spec}: took {len(files)} files ({taken:,} bytes)" + (f"; {skipped_text}" if skipped_text else ""),
          file=sys.stderr)
    return files


def expand_paths(spec: str) -> list:
    """A file, the text files under a folder (see ``folder_files``), or the files a glob matches, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return folder_files(spec, path)
    if any(c in spec for c in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        return files
    raise DataError(f"{spec}: no such file or folder")


def _cache_name(kind: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return f"{kind}-{digest}.bin"


def _file_stamp(files) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def load_bytes(spec: str, cache_dir) -> np.ndarray:
    """A file is memory-mapped in place; several files are concatenated once into a cached byte file."""
    files = expand_paths(spec)
    total = sum(p.stat().st_size for p in files)
    if total == 0:
        raise DataError(f"{spec}: the corpus is empty (0 bytes)")
    if len(files) == 1:
        return memmap_bytes(files[0])
    cached = Path(cache_dir) / _cache_name("files", {"files": _file_stamp(files)})
    if not cached.exists():

        def write(f):
            for p in tqdm(files, desc=f"caching {len(files)} files", unit="file", leave=False):
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)

        atomic_write(cached, write)
    return memmap_bytes(cached)


def looks_like_path(spec: str) -> bool:
    """A local path rather than a hub name (``name`` or ``owner/name``): never to be tried on the Hub."""
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in DATASET_FILE_BUILDERS
    )


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


def open_dataset(spec: str, split: str):
    """A ``datasets.Dataset``: a saved dataset (``load_from_disk``), local data files, or a hub name."""
    import datasets  # before quiet_logs: importing it sets its log level

    path = Path(spec).expanduser()
    try:
        with quiet_logs():
            return _open_dataset(datasets, spec, path, split)
    except DataError:
        raise
    except HubSilent as e:
        raise DataError(f"{spec}: cannot load the dataset: {e}") from None
    except Exception as e:
        where = "" if path.exists() else " from the Hub"
        raise DataError(f"{spec}: cannot load the dataset{where} (split {split!r}): {summary(e)}") from None


def _open_dataset(datasets, spec: str, path: Path, split: str):
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{spec}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
        return ds
    if path.is_file():
        builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{spec}: unknown dataset file type; use one of {', '.join(DATASET_FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split)
    with bounded_network():  # a hub name
        return datasets.load_dataset(spec, split=split)


def text_column(ds, text_field, spec: str) -> str:
    """The given column, or the only string column; a clear error listing the columns otherwise."""
    columns = ", ".join(f"{name} ({getattr(feat, 'dtype', type(feat).__name__)})" for name, feat in ds.features.items())
    if text_field is not None:
        if text_field not in ds.column_names:
            raise DataError(f"{spec}: no column {text_field!r}; columns: {columns}")
        return text_field
    strings = [
        name for name, feat in ds.features.items() if getattr(feat, "dtype", None) in ("string", "large_string")
    ]
    if len(strings) != 1:
        found = "no string column" if not strings else f"{len(strings)} string columns"
        raise DataError(f"{spec}: {found}; pick the text with --text-field; columns: {columns}")
    return strings[0]


def _dataset_key(spec: str, split: str, text_field) -> dict:
    path = Path(spec).expanduser()
    key = {"dataset": spec, "split": split, "text_field": text_field}
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        key["files"] = _file_stamp(files)
    return key


def load_dataset_bytes(spec: str, split: str, text_field, cache_dir) -> np.ndarray:
    """A dataset split's text column as UTF-8 bytes (rows joined by newlines), encoded once and cached."""
    if looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise DataError(f"{spec}: no such dataset file or folder")
    cached = Path(cache_dir) / _cache_name("dataset", _dataset_key(spec, split, text_field))
    if cached.exists():
        return memmap_bytes(cached)
    ds = open_dataset(spec, split)
    column = text_column(ds, text_field, spec)
    if len(ds) == 0:
        raise DataError(f"{spec}: split {split!r} has no rows")

    def write(f):
        written = 0
        for rows in tqdm(ds.iter(batch_size=1000), total=-(-len(ds) // 1000), desc="encoding dataset", leave=False):
            data = "".join(f"{text}\n" for text in rows[column] if text).encode("utf-8")
            f.write(data)
            written += len(data)
        if written == 0:
            raise DataError(f"{spec}: column {column!r} of split {split!r} holds no text")

    atomic_write(cached, write)
    return memmap_bytes(cached)


def split_corpus(data: np.ndarray, source: str) -> Corpus:
    """The first 90% for training, the last 10% for validation (views, nothing copied)."""
    n_train = int(len(data) * (1 - VAL_FRACTION))
    return Corpus(data[:n_train], data[n_train:], source)


def corpus_options(args) -> dict:
    """The keywords of ``load_corpus`` from the options of ``add_data_arguments``."""
    return {name: getattr(args, name) for name in ("data", "dataset", "val_data", "text_field", "split", "val_split")}


def load_corpus(cache_dir, data=None, dataset=None, val_data=None, text_field=None, split="train",
                val_split=None) -> Corpus:
    """The corpus of a text file, folder or glob (``data``), or of a Hugging Face ``dataset`` (its ``split``,
    column ``text_field``), or the built-in one; validation: ``val_data``, ``val_split``, else the last 10%.
    Files that need encoding or joining are cached in ``cache_dir``.
    """
    if dataset is not None:
        train = load_dataset_bytes(dataset, split, text_field, cache_dir)
        source = f"dataset {dataset} [{split}]"
        if val_split is not None:
            return Corpus(train, load_dataset_bytes(dataset, val_split, text_field, cache_dir), source)
    elif data is not None:
        train, source = load_bytes(data, cache_dir), data
    else:
        train = np.frombuffer(default_corpus_bytes(), dtype=np.uint8)
        source = "the built-in corpus (pydoc_data.topics)"
    if val_data is not None:
        return Corpus(train, load_bytes(val_data, cache_dir), source)
    return split_corpus(train, source)


def _crops(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows ``data[s : s + length]`` for each start, reading only those bytes."""
    return np.lib.stride_tricks.sliding_window_view(data, length)[starts]


class BatchSampler:
    """Random crops of ``block_size + 1`` bytes; its generator state is saved for an exact resume."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, seed: int):
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict):
        self.rng.bit_generator.state = value

    def sample(self, n_micro: int = 1) -> np.ndarray:
        """``n_micro`` batches of crops, shaped (n_micro, batch_size, block_size + 1), uint8."""
        length = self.block_size + 1
        starts = self.rng.integers(0, len(self.data) - length + 1, size=n_micro * self.batch_size)
        return _crops(self.data, starts, length).reshape(n_micro, self.batch_size, length)


def eval_batches(data: np.ndarray, batch_size: int, block_size: int, n_batches: int) -> np.ndarray:
    """A fixed set of evenly spaced crops, (n_batches, batch_size, block_size + 1): the same on every call."""
    length = block_size + 1
    starts = np.linspace(0, len(data) - length, num=n_batches * batch_size).round().astype(np.int64)
    return _crops(data, starts, length).reshape(n_batches, batch_size, length)
