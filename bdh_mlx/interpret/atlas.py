"""The neuron atlas: for every x and y neuron, its firing rate, mean activation and top-k contexts in a corpus.

Saved as ``atlas.npz`` (arrays) and ``atlas.json`` (what was read, sizes, per-layer summaries); query it with
``Atlas.load(folder)``, ``atlas.top_contexts(layer, head, neuron, kind="x")`` and ``atlas.search("text")``.
"""

import json
from pathlib import Path

import numpy as np

from bdh_mlx.storage.files import atomic_savez, atomic_write_text, read_npz

from .common import (
    CHUNK_SIZE,
    KINDS,
    InterpretError,
    as_bytes,
    check_kind,
    check_neuron,
    render_snippet,
    stream_activations,
    windows,
)

NPZ_NAME, JSON_NAME = "atlas.npz", "atlas.json"


def merge_top_k(values, offsets, new_values, new_offsets, k: int):
    """Keep the ``k`` largest along the last axis of the old candidates and the new ones (unordered)."""
    values = np.concatenate([values, new_values], axis=-1)
    offsets = np.concatenate([offsets, np.broadcast_to(new_offsets, new_values.shape)], axis=-1)
    keep = np.argpartition(-values, k - 1, axis=-1)[..., :k]
    return np.take_along_axis(values, keep, -1), np.take_along_axis(offsets, keep, -1)


class _Config:
    """The sizes check_neuron needs, read back from atlas.json."""

    def __init__(self, meta):
        self.n_layer, self.n_head, self.n_neurons = meta["n_layer"], meta["n_head"], meta["n_neurons"]


class Atlas:
    """Per kind (x, y): ``rate``, ``mean`` (L, nh, N); ``top_values``, ``top_offsets`` (L, nh, N, k), largest first
    (offset -1: fewer than k firings); ``top_windows`` (L, nh, N, k, 2 * context + 1): the bytes around each."""

    def __init__(self, arrays: dict, meta: dict):
        self.arrays, self.meta = arrays, meta
        self.config = _Config(meta)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def save(self, folder):
        folder = Path(folder)
        atomic_savez(folder / NPZ_NAME, self.arrays)
        atomic_write_text(folder / JSON_NAME, json.dumps(self.meta, indent=1))

    @classmethod
    def load(cls, folder) -> "Atlas":
        folder = Path(folder)
        if not (folder / JSON_NAME).is_file():
            raise InterpretError(f"{folder}: not a neuron atlas (no {JSON_NAME})")
        meta = json.loads((folder / JSON_NAME).read_text())
        return cls(read_npz(folder / NPZ_NAME, "neuron atlas"), meta)

    def top_contexts(self, layer: int, head: int, neuron: int, kind: str = "x") -> list:
        """The neuron's strongest firings: dicts of ``offset``, ``value`` and ``snippet`` (firing byte in [ ])."""
        check_kind(kind)
        check_neuron(self.config, layer, head, neuron)
        at = (layer, head, neuron)
        offsets, values = self[f"{kind}_top_offsets"][at], self[f"{kind}_top_values"][at]
        return [{"offset": int(o), "value": float(v), "snippet": render_snippet(w)}
                for o, v, w in zip(offsets, values, self[f"{kind}_top_windows"][at], strict=False) if o >= 0]

    def search(self, text: str, kind: str | None = None) -> list:
        """Neurons whose top contexts contain ``text``: dicts of kind, layer, head, neuron and ``matches``
        (how many of its top-k contexts hold it), most matches first."""
        needle = text.encode("utf-8")
        if not needle:
            raise InterpretError("the search text is empty")
        kinds = KINDS if kind is None else [kind]
        for k in kinds:
            check_kind(k)
        found = []
        for k in kinds:
            w = self[f"{k}_top_windows"]
            as_strings = np.ascontiguousarray(w).view(f"S{w.shape[-1]}")[..., 0]  # (L, nh, N, k)
            matches = ((np.char.find(as_strings, needle) >= 0) & (self[f"{k}_top_offsets"] >= 0)).sum(axis=-1)
            for layer, head, neuron in np.argwhere(matches > 0):
                found.append({"kind": k, "layer": int(layer), "head": int(head), "neuron": int(neuron),
                              "matches": int(matches[layer, head, neuron])})
        return sorted(found, key=lambda f: -f["matches"])


def build_atlas(model, text, top_k: int = 10, context: int = 24, chunk_size: int = CHUNK_SIZE,
                progress: bool = True, source: str = "text") -> Atlas:
    """Stream ``text`` through ``model`` once, keeping per neuron its firing count, sum and top-k firings."""
    if top_k < 1:
        raise InterpretError(f"top_k must be at least 1, got {top_k}")
    data = as_bytes(text)
    c = model.config
    shape = (c.n_layer, c.n_head, c.n_neurons)
    fires = {k: np.zeros(shape, np.int64) for k in KINDS}
    sums = {k: np.zeros(shape, np.float64) for k in KINDS}
    top = {k: (np.full((*shape, top_k), -np.inf, np.float32), np.full((*shape, top_k), -1, np.int64)) for k in KINDS}
    for start, acts in stream_activations(model, data, chunk_size, progress, desc="neuron atlas"):
        offsets = start + np.arange(acts[0]["x"].shape[1])
        for layer, a in enumerate(acts):
            for k in KINDS:
                values = a[k].transpose(0, 2, 1)  # (nh, N, T)
                fires[k][layer] += (values > 0).sum(-1)
                sums[k][layer] += values.sum(-1)
                merged = merge_top_k(top[k][0][layer], top[k][1][layer], values, offsets, top_k)
                top[k][0][layer], top[k][1][layer] = merged
    arrays = {}
    for k in KINDS:
        values, offsets = top[k]
        order = np.argsort(-values, axis=-1, kind="stable")
        values, offsets = np.take_along_axis(values, order, -1), np.take_along_axis(offsets, order, -1)
        offsets = np.where(values > 0, offsets, -1)  # a zero activation is not a firing
        values = np.where(values > 0, values, 0).astype(np.float32)
        arrays.update({f"{k}_rate": (fires[k] / len(data)).astype(np.float32),
                       f"{k}_mean": (sums[k] / len(data)).astype(np.float32),
                       f"{k}_top_values": values, f"{k}_top_offsets": offsets,
                       f"{k}_top_windows": windows(data, offsets, context)})
    meta = {"source": source, "n_bytes": int(len(data)), "top_k": top_k, "context": context,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_neurons": c.n_neurons,
            "layers": [{f"{k}_active": float(arrays[f"{k}_rate"][layer].mean()) for k in KINDS}
                       for layer in range(c.n_layer)]}
    return Atlas(arrays, meta)
