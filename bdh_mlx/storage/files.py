"""Small helpers shared by the library and the commands."""

import errno
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from bdh_mlx.errors import CheckpointError

COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


class eval_mode:
    """``with eval_mode(model):`` dropout off inside, the previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.training)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    A crash or Ctrl-C midway leaves the old file (if any) untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; a file name is needed", str(path))
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: report the file the user named, not the temporary one
        Path(tmp).unlink(missing_ok=True)
        if e.filename not in (None, tmp):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_dirs(path):
    """``mkdir -p``; a file in the way is reported as "Not a directory", naming it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None


NPY_HEADER_MAX = 10_000  # numpy's own limit on a .npy header (read_array_header_*'s max_header_size)
NPY_PREFIX_MAX = 12  # magic, version and header length before the header text
MAX_MEMBERS = 10_000
READ_CHUNK = 1 << 24
DEFAULT_KINDS = "biuf"  # bool, integers, floats: nothing that needs unpickling or has fields


class NpyHeader(NamedTuple):
    """What a member's ``.npy`` header declares, and how many bytes the header took."""

    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    size: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class _CountingReader:
    """A file-like view of ``f`` that reads at most ``limit`` bytes and counts them."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.count = f, limit, 0

    def read(self, n: int = -1) -> bytes:
        n = self.limit - self.count if n < 0 else min(n, self.limit - self.count)
        data = self.f.read(n) if n > 0 else b""
        self.count += len(data)
        return data


class NpzReader:
    """A strict, bounded reader of ``.npz`` archives (``with NpzReader(path) as npz: npz.read(name)``).

    Names, declared sizes and ``.npy`` headers are checked before anything is inflated; a member never
    inflates past its declared size, and the declared sizes together must fit in ``max_bytes`` (default:
    the machine's memory). Nothing is unpickled; object and structured dtypes are refused; big-endian
    arrays come back in native byte order. Every problem is one CheckpointError naming ``path``.
    """

    def __init__(self, path, what: str = "file", max_bytes: int | None = None):
        self.path = path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such {what}")
        if not path.is_file():
            raise CheckpointError(f"{path}: not a file")
        if not zipfile.is_zipfile(path):
            raise self.error(f"not a readable .npz {what} (not a zip archive: a different file, or truncated)")
        try:
            self.zip = zipfile.ZipFile(path)
        except Exception as e:  # whatever a damaged central directory makes zipfile raise
            raise self.error(f"not a readable .npz {what} ({type(e).__name__}: {e})") from None
        try:
            self.members = self._check_members(what, physical_memory() if max_bytes is None else max_bytes)
        except BaseException:
            self.zip.close()
            raise
        self.names = list(self.members)

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _check_members(self, what: str, max_bytes: int | None) -> dict:
        infos = self.zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise self.error(f"not a readable .npz {what} ({len(infos)} entries, more than {MAX_MEMBERS})")
        members = {}
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or "/" in name or "\\" in name or name in (".npy", "..npy"):
                raise self.error(f"not a readable .npz {what} (entry {name!r} is not a plain .npy name)")
            if info.flag_bits & 0x1:
                raise self.error(f"not a readable .npz {what} (entry {name!r} is encrypted)")
            key = name[: -len(".npy")]
            if key in members:
                raise self.error(f"not a readable .npz {what} (entry {name!r} appears twice)")
            members[key] = info
        total = sum(info.file_size for info in infos)
        if max_bytes is not None and total > max_bytes:
            raise self.error(
                f"its entries declare {_gib(total)} of arrays, more than the {_gib(max_bytes)} allowed "
                f"(this machine's memory); refusing to inflate them"
            )
        return members

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def declared_size(self, name: str) -> int:
        """The uncompressed size the archive declares for ``name`` (nothing is inflated)."""
        return self.members[name].file_size

    def check_declared_size(self, name: str, max_bytes: int, reason: str = ""):
        """Refuse ``name`` before inflating it if it declares more than ``max_bytes``."""
        size = self.declared_size(name)
        if size > max_bytes:
            why = f" ({reason})" if reason else ""
            raise self.error(f"{name} declares {size:,} bytes, more than the {max_bytes:,} allowed{why}")

    def _open(self, name: str):
        if name not in self.members:
            raise self.error(f"no entry {name!r}")
        return self.zip.open(self.members[name])

    def _read_header(self, f, name: str) -> NpyHeader:
        counted = _CountingReader(f, NPY_PREFIX_MAX + NPY_HEADER_MAX)
        try:
            version = np.lib.format.read_magic(counted)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(counted, NPY_HEADER_MAX)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(counted, NPY_HEADER_MAX)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
        except Exception as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise self.error(f"{name} is not a .npy array ({message[:200]})") from None
        if any(d < 0 for d in shape):
            raise self.error(f"{name} has a negative dimension in its shape {shape}")
        return NpyHeader(tuple(shape), dtype, bool(fortran_order), counted.count)

    def header(self, name: str) -> NpyHeader:
        """The ``.npy`` header of ``name``; inflates at most a few KiB."""
        try:
            with self._open(name) as f:
                return self._read_header(f, name)
        except CheckpointError:
            raise
        except Exception as e:  # a bad CRC, a truncated or undecodable stream, an unsupported compression
            raise self.error(f"{name}: damaged entry ({type(e).__name__}: {e})") from None

    def read(self, name: str, kinds: str = DEFAULT_KINDS, max_bytes: int | None = None) -> np.ndarray:
        """The array ``name``, in native byte order, if its dtype kind is one of ``kinds``.

        ``max_bytes`` bounds its declared size (checked before inflating). The declared size must be
        exactly the header plus the data the header describes, and the CRC must match.
        """
        if max_bytes is not None:
            self.check_declared_size(name, max_bytes)
        try:
            with self._open(name) as f:
                header = self._read_header(f, name)
                dtype = self._check_dtype(name, header.dtype, kinds)
                declared = self.declared_size(name)
                if declared != header.size + header.nbytes:
                    raise self.error(
                        f"{name} declares {declared:,} bytes, but its header describes "
                        f"{header.size + header.nbytes:,} ({header.shape} of {dtype})"
                    )
                data = np.empty(header.nbytes, dtype=np.uint8)
                view, done = memoryview(data), 0
                while done < header.nbytes:
                    chunk = f.read(min(READ_CHUNK, header.nbytes - done))
                    if not chunk:
                        raise self.error(f"{name} ends after {done:,} of {header.nbytes:,} bytes")
                    view[done : done + len(chunk)] = chunk
                    done += len(chunk)
                if f.read(1):
                    raise self.error(f"{name} holds more bytes than it declares")
        except CheckpointError:
            raise
        except Exception as e:  # a bad CRC, a truncated or undecodable stream, an unsupported compression
            raise self.error(f"{name}: damaged entry ({type(e).__name__}: {e})") from None
        array = data.view(dtype).reshape(header.shape, order="F" if header.fortran_order else "C")
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
        return np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)

    def _check_dtype(self, name: str, dtype: np.dtype, kinds: str) -> np.dtype:
        if dtype.hasobject:
            raise self.error(f"{name} holds Python objects (dtype {dtype}); refusing to unpickle")
        if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds or dtype.itemsize > 8:
            wanted = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "floating point"}
            raise self.error(f"{name} has dtype {dtype}, expected {' or '.join(wanted[k] for k in kinds)}")
        return dtype


def shape_fits(shape: tuple, pattern: tuple | None) -> bool:
    """Whether ``shape`` matches ``pattern`` (None: anything; a None dimension: any size)."""
    if pattern is None:
        return True
    return len(shape) == len(pattern) and all(w is None or w == g for g, w in zip(shape, pattern, strict=True))


def read_npz(path, what: str = "file", expected: dict | None = None, max_bytes: int | None = None) -> dict:
    """All arrays of an ``.npz`` (never unpickling, bounded: see NpzReader); problems are CheckpointErrors.

    ``expected`` maps each name the file must hold to ``(shape, kinds)``: ``shape`` a tuple (None for
    a free dimension) or None, ``kinds`` the allowed numpy dtype kinds (e.g. ``"f"``). ``max_bytes``
    bounds the declared total (default: this machine's memory).
    """
    with NpzReader(path, what, max_bytes) as npz:
        if expected is None:
            return {name: npz.read(name) for name in npz.names}
        check_names(path, "entries do not match", expected, npz.names)
        for name, (shape, _) in expected.items():
            if shape is not None and None not in shape:
                npz.check_declared_size(name, NPY_PREFIX_MAX + NPY_HEADER_MAX + math.prod(shape) * 8)
        for name, (shape, _) in expected.items():
            got = npz.header(name).shape
            if not shape_fits(got, shape):
                raise CheckpointError(f"{path}: {name} has shape {got}, expected {shape}")
        return {name: npz.read(name, kinds) for name, (_, kinds) in expected.items()}


def check_names(source, what: str, expected, got):
    """Raise CheckpointError naming ``source`` unless ``got`` holds exactly the names in ``expected``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source}: {what}: {'; '.join(problems)}")


def atomic_savez(path, arrays):
    """Write a dict of numpy arrays as one ``.npz`` file, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path, text):
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
