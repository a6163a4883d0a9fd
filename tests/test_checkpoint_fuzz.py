"""Hostile and damaged checkpoints and caches: every outcome is a loaded model or one CheckpointError.

Variants of a real (small) checkpoint: byte flips, truncations, zero runs, bad ``.npy`` headers, foreign
dtypes, deep JSON, entries that declare huge sizes (zip bombs), absurd or incomplete configs, NaN weights
and a future format. Each must finish fast; the bombs must be refused before they are inflated.
"""

import io
import json
import pickle
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import bdh_mlx
from bdh_mlx import BDH, BDHCache, BDHConfig, CheckpointError
from bdh_mlx.storage.files import read_npz
from bdh_mlx.storage.format import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION

CONFIG = BDHConfig(n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=16, dropout=0.0)
SECONDS_PER_VARIANT = 1.0


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.npz"
    bdh_mlx.save(BDH(CONFIG), path)
    return path


def members(path) -> dict:
    """name -> raw .npy bytes of each entry."""
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def write_zip(path, entries: dict, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def npy(array=None, header=None) -> bytes:
    """``array`` as .npy bytes, or a hand-made header dict followed by the array's raw bytes."""
    f = io.BytesIO()
    if header is None:
        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"" if array is None else np.asarray(array).tobytes())
    return f.getvalue()


def config_npy(params: dict | str) -> bytes:
    text = params if isinstance(params, str) else json.dumps(params)
    return npy(np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8))


def replaced(good, tmp_path, name, **entries):
    """A copy of the good checkpoint with some entries replaced (None drops one); the raw name is ``x.npy``."""
    out = tmp_path / f"{name}.npz"
    base = members(good)
    for key, data in entries.items():
        key = {"config": f"{CONFIG_KEY}.npy", "format": f"{FORMAT_KEY}.npy"}.get(key, f"{key}.npy")
        if data is None:
            base.pop(key)
        else:
            base[key] = data
    write_zip(out, base)
    return out


def outcome(path, load=bdh_mlx.load) -> str:
    """'loaded' or 'refused: <message>'; anything else fails the test. Also checks the time bound."""
    tic = time.perf_counter()
    try:
        load(path)
        result = "loaded"
    except CheckpointError as e:
        text = str(e)
        assert text.startswith(f"{path}: ") and "\n" not in text, text
        result = f"refused: {text[len(str(path)) + 2:]}"
    elapsed = time.perf_counter() - tic
    assert elapsed < SECONDS_PER_VARIANT, f"{path.name} took {elapsed:.2f} s"
    return result


def test_byte_flips_truncations_and_zero_runs(good, tmp_path):
    data = good.read_bytes()
    results = {}
    variants = []
    for offset in range(0, len(data), max(1, len(data) // 400)):
        variants.append((f"flip{offset}", data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]))
    for length in np.linspace(0, len(data) - 1, 40).astype(int):
        variants.append((f"cut{length}", data[:length]))
    for offset in range(0, len(data), max(1, len(data) // 40)):
        variants.append((f"zeros{offset}", data[:offset] + bytes(64) + data[offset + 64 :]))
    tic = time.perf_counter()
    path = tmp_path / "variant.npz"
    for name, blob in variants:
        path.write_bytes(blob)
        results[name] = outcome(path)
    assert time.perf_counter() - tic < 8.0
    # A flip inside any array's data is caught (CRC): most variants are refused, none crashes.
    refused = sum(r.startswith("refused") for r in results.values())
    assert refused >= 0.9 * len(variants), [r for r in results.values() if r == "loaded"][:5]
    assert all(results[f"cut{n}"].startswith("refused") for n in np.linspace(0, len(data) - 1, 40).astype(int))


def test_cache_byte_flips(tmp_path):
    cache = BDH(CONFIG).make_cache(1)
    good = tmp_path / "cache.npz"
    cache.save(good)
    data = good.read_bytes()
    path = tmp_path / "variant.npz"
    results = []
    for offset in range(0, len(data), max(1, len(data) // 150)):
        path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x5A]) + data[offset + 1 :])
        results.append(outcome(path, lambda p: BDHCache.load(p, config=CONFIG)))
    assert sum(r.startswith("refused") for r in results) >= 0.9 * len(results)


WEIGHT = "encoder"  # shape (nh, D, N) = (2, 16, 32)
SHAPE = (2, 16, 32)


def values():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize(
    "entry, message",
    [
        (b"", "encoder is not a .npy array"),
        (b"\x01\x02 raw bytes, no header" * 10, "encoder is not a .npy array"),
        (pickle.dumps(values()), "encoder is not a .npy array"),
        (npy(header={"descr": "|O", "fortran_order": False, "shape": SHAPE}) + pickle.dumps([1]),
         "encoder has dtype object, expected floating point"),
        (npy(np.zeros(SHAPE, np.int32)), "encoder has dtype int32, expected floating point"),
        (npy(np.zeros(SHAPE, [("a", "<f4")])), "expected floating point"),
        (npy(np.zeros(SHAPE, np.complex64)), "encoder has dtype complex64, expected floating point"),
        (npy(np.zeros((2, 16, 31), np.float32)), "encoder has shape (2, 16, 31), but the config needs (2, 16, 32)"),
        (npy(values(), header={"descr": "<f4", "fortran_order": False, "shape": (2, 16, 64)}),
         "encoder has shape (2, 16, 64), but the config needs (2, 16, 32)"),
        (npy(values(), header={"descr": "<f8", "fortran_order": False, "shape": SHAPE}),
         "encoder declares 4,224 bytes, but its header describes 8,320"),  # 128 + 1024 * 4 vs 128 + 1024 * 8
        (npy(values())[:-4], "encoder declares"),
        (npy(values()) + b"\0" * 4, "encoder declares"),
        (npy(values(), header={"descr": "<f4", "fortran_order": False, "shape": (2, -16, -32)}),
         "encoder has a negative dimension in its shape (2, -16, -32)"),
        (b"\x93NUMPY\x03\x00" + npy(values())[8:], "encoder is not a .npy array (.npy format version 3.0"),
        (b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 65535, "encoder declares 65,545 bytes, more than the"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 12000) + b"{" * 12000,
         "encoder is not a .npy array"),  # a header over numpy's 10,000-byte limit
        (npy(np.full(SHAPE, np.nan, np.float32)), "encoder holds NaN or infinite values"),
        (npy(np.full(SHAPE, np.inf, np.float16)), "encoder holds NaN or infinite values"),
    ],
)
def test_bad_weight_entries_are_refused(good, tmp_path, entry, message):
    path = replaced(good, tmp_path, "bad", **{WEIGHT: entry})
    assert message in outcome(path)


@pytest.mark.parametrize("dtype", [">f4", "<f2", ">f2", ">f8"])
def test_other_float_encodings_load_as_the_same_float32(good, tmp_path, dtype):
    weights = values()
    path = replaced(good, tmp_path, "enc", **{WEIGHT: npy(weights.astype(dtype))})
    model = bdh_mlx.load(path)
    np.testing.assert_array_equal(np.array(model.encoder), weights.astype(dtype).astype(np.float32))


def test_fortran_order_loads_in_the_right_order(good, tmp_path):
    weights = values()
    path = replaced(good, tmp_path, "fortran", **{WEIGHT: npy(np.asfortranarray(weights))})
    np.testing.assert_array_equal(np.array(bdh_mlx.load(path).encoder), weights)


FULL = CONFIG.to_dict()


@pytest.mark.parametrize(
    "config, message",
    [
        ("[" * 30000 + "]" * 30000, "unreadable config (JSON nested too deeply)"),
        ("[" * 100_000 + "]" * 100_000, f"{CONFIG_KEY} declares"),  # over the 64 KiB bound: never inflated
        (json.dumps({**FULL, "note": "x" * 80_000}), f"{CONFIG_KEY} declares"),
        ("[1, 2]", "unreadable config (a JSON list, not an object)"),
        ("\udcff{}", "unreadable config"),
        (json.dumps({**FULL, "n_layer": 10**9}), "invalid config: n_layer must be at most 1,024, got 1000000000"),
        (json.dumps({**FULL, "n_layer": 10**30}), "invalid config: n_layer must be at most 1,024, got about 2**99"),
        (json.dumps({**FULL, "n_layer": "2"}), "invalid config: n_layer must be a positive integer, got '2'"),
        (json.dumps({**FULL, "n_layer": [2]}), "invalid config: n_layer is not a single value"),
        (json.dumps({**FULL, "dropout": float("nan")}), "invalid config: dropout must be in [0, 1), got nan"),
        (json.dumps({**FULL, "vocab_size": 10**4000 // 10**3990}), "vocab_size must be at most"),
        ('{"n_layer": 1' + "0" * 5000 + "}", "unreadable config"),  # beyond Python's int-parsing limit
        (json.dumps({k: v for k, v in FULL.items() if k != "n_head"}), "invalid config: missing n_head"),
        (json.dumps({k: v for k, v in FULL.items() if k not in ("dropout", "chunk_size")}),
         "invalid config: missing dropout, chunk_size"),
    ],
)
def test_bad_configs_are_refused(good, tmp_path, config, message):
    path = replaced(good, tmp_path, "config", config=config_npy(config))
    assert message in outcome(path)


def test_format_version_is_checked(good, tmp_path):
    newer = replaced(good, tmp_path, "newer", format=npy(np.array(FORMAT_VERSION + 1, np.int32)))
    assert outcome(newer) == (
        f"refused: checkpoint format {FORMAT_VERSION + 1} comes from a newer bdh-mlx; this version reads format "
        f"{FORMAT_VERSION} (pip install -U bdh-mlx)"
    )
    assert "unknown checkpoint format 0" in outcome(replaced(good, tmp_path, "zero", format=npy(np.array(0))))
    assert "holds 2 values" in outcome(replaced(good, tmp_path, "two", format=npy(np.array([1, 1]))))
    assert "expected signed integer or unsigned integer" in outcome(
        replaced(good, tmp_path, "float", format=npy(np.array(1.0)))
    )
    assert outcome(replaced(good, tmp_path, "absent", format=None)) == "loaded"  # files before the entry existed


@pytest.mark.parametrize(
    "names, message",
    [
        (["../escape.npy"], "is not a plain .npy name"),
        (["sub/encoder.npy"], "is not a plain .npy name"),
        (["notes.txt"], "is not a plain .npy name"),
        ([f"{WEIGHT}.npy"], "appears twice"),
    ],
)
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_bad_entry_names(good, tmp_path, names, message):
    path = tmp_path / "names.npz"
    base = members(good)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in base.items():
            z.writestr(name, data)
        for name in names:
            z.writestr(name, base[f"{WEIGHT}.npy"])
    assert message in outcome(path)


def patch_declared_size(path, name: str, size: int):
    """Rewrite the uncompressed size of ``name`` in the zip's central directory (the size readers trust)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len].decode() == name:
            struct.pack_into("<I", data, at + 24, size)
            break
        extra, comment = struct.unpack_from("<HH", data, at + 30)
        at += 46 + name_len + extra + comment
    path.write_bytes(bytes(data))


def test_declared_sizes_are_checked_before_inflating(good, tmp_path):
    path = tmp_path / "declared.npz"
    path.write_bytes(good.read_bytes())
    patch_declared_size(path, f"{WEIGHT}.npy", 2**32 - 1)
    assert "encoder declares 4,294,967,295 bytes, more than the" in outcome(path)
    path.write_bytes(good.read_bytes())
    patch_declared_size(path, f"{CONFIG_KEY}.npy", 10**9)
    assert f"{CONFIG_KEY} declares 1,000,000,000 bytes" in outcome(path)
    path.write_bytes(good.read_bytes())
    patch_declared_size(path, f"{WEIGHT}.npy", 100)  # smaller than the data: never read past it
    assert "encoder" in outcome(path)


BOMB_SCRIPT = """
import resource, sys
import bdh_mlx
from bdh_mlx import CheckpointError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        bdh_mlx.load(path)
        print("loaded", path)
    except CheckpointError as e:
        print("refused", e)
print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_zip_bombs_are_refused_before_inflating(good, tmp_path):
    """Zeros deflate ~1000:1: a weight of 200 MB in ~200 KB, a config or an extra entry of 16 MB; never inflated."""
    base = members(good)
    paths = []
    for name, size in ((f"{WEIGHT}.npy", 200 * 2**20), (f"{CONFIG_KEY}.npy", 16 * 2**20), ("extra.npy", 16 * 2**20)):
        path = tmp_path / f"bomb_{name}.npz"
        write_zip(path, {**base, name: npy(np.zeros(size, np.uint8))}, zipfile.ZIP_DEFLATED)
        assert path.stat().st_size < size / 500
        paths.append(path)
    tic = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "encoder declares 209,715,328 bytes, more than the" in lines[0]  # 200 MiB + a 128-byte header
    assert f"{CONFIG_KEY} declares 16,777,344 bytes, more than the" in lines[1]
    assert "weights do not match the model: unexpected extra" in lines[2]
    assert int(lines[3].split()[1]) < 30 * 1024, lines[3]  # peak memory grew by < 30 MiB
    assert time.perf_counter() - tic < 10


def test_total_declared_size_is_bounded(good, tmp_path):
    with pytest.raises(CheckpointError, match=r"its entries declare 0\.0 GiB of arrays, more than the 0\.0 GiB"):
        read_npz(good, "checkpoint file", max_bytes=1000)


def test_read_npz_keeps_scalars_and_checks_expected_entries(tmp_path):
    path = tmp_path / "state.npz"
    np.savez(path, step=np.array(7, np.uint64), m=np.ones((2, 3), ">f4"))
    arrays = read_npz(path)
    assert arrays["step"].shape == () and arrays["step"] == 7 and arrays["m"].dtype == np.dtype("<f4")
    assert read_npz(path, expected={"step": ((), "u"), "m": ((None, 3), "f")})["m"].shape == (2, 3)
    with pytest.raises(CheckpointError, match=r"m has shape \(2, 3\), expected \(2, 4\)"):
        read_npz(path, expected={"step": ((), "u"), "m": ((2, 4), "f")})
    with pytest.raises(CheckpointError, match="entries do not match: missing v; unexpected step"):
        read_npz(path, expected={"v": (None, "f"), "m": (None, "f")})
    with pytest.raises(CheckpointError, match="step has dtype uint64, expected floating point"):
        read_npz(path, expected={"step": (None, "f"), "m": (None, "f")})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("offset"), "not a bdh-mlx cache"),
        (lambda a: a.pop("state_0"), "not a bdh-mlx cache"),
        (lambda a: a.pop("state_1"), "cache of 1 layers of (2, 32, 16) does not fit the model (2 layers of"),
        (lambda a: a.update(state_1=a["state_1"][:, :1]), "the states are not all of one"),
        (lambda a: a.update(offset=np.zeros(3, np.int32)), "offset has shape (3,), expected (1,)"),
        (lambda a: a.update(offset=np.array([-1], np.int64)), "offset holds positions outside"),
        (lambda a: a.update(state_0=a["state_0"].astype(np.int32)), "state_0 has dtype int32"),
        (lambda a: a.update(state_0=np.full_like(a["state_0"], 1, ">f4")), None),
        (lambda a: a.update(state_0=a["state_0"][:0], state_1=a["state_1"][:0], offset=np.zeros(0, np.int32)),
         "the cache holds no rows (texts)"),
        (lambda a: a["state_1"].__setitem__((0, 1, 5, 3), np.nan), "state_1 holds NaN or infinite values"),
        (lambda a: a["state_0"].__setitem__((0, 0, 0, 0), -np.inf), "state_0 holds NaN or infinite values"),
    ],
)
def test_bad_caches(tmp_path, change, message):
    arrays = {f"state_{i}": np.zeros((1, 2, 32, 16), np.float32) for i in range(2)} | {"offset": np.array([3])}
    change(arrays)
    path = tmp_path / "cache.npz"
    np.savez(path, **arrays)
    result = outcome(path, lambda p: BDHCache.load(p, config=CONFIG))
    assert result == "loaded" if message is None else message in result
    if message is None:
        assert np.array(BDHCache.load(path).states[0]).tolist() == np.ones((1, 2, 32, 16)).tolist()
