"""The interpretability kit on hand-built models whose answers are known, and against direct computations."""

import json
import math
import re

import mlx.core as mx
import numpy as np
import pytest

from bdh_mlx.cli import main as cli_main
from bdh_mlx.interpret import (
    Atlas,
    InterpretError,
    activation_stats,
    build_atlas,
    build_report,
    concept_synapses,
    degrees,
    modularity,
    neuron_graph,
    power_law_fit,
    synapse_series,
    synapse_state,
)
from bdh_mlx.model import BDH, BDHConfig
from bdh_mlx.storage import checkpoint

SQRT7 = math.sqrt(7)  # LN of a one-hot vector of width 8, at its hot entry


def one_byte_model(n_layer=2):
    """D = 8, one head, N = 16; only neuron 0 of x and y is wired, to embedding dimension 0, which only byte 'a'
    has. So x[0] = sqrt(7) exactly at the bytes 'a' (every layer: the decoder is zero, v stays LN(embed)), and
    y[0] = sqrt(7) at an 'a' whose attention read sum_{s < t, 'a'} cos(t - s) is positive (RoPE: f[0] = 1/2pi)."""
    model = BDH(BDHConfig(n_layer=n_layer, n_embd=8, n_head=1, mlp_internal_dim_multiplier=2, dropout=0.0))
    embed = np.zeros((256, 8), np.float32)
    embed[ord("a"), 0] = 1
    wire = np.zeros((1, 8, 16), np.float32)
    wire[0, 0, 0] = 1
    model.embed.weight, model.encoder, model.encoder_v = mx.array(embed), mx.array(wire), mx.array(wire)
    model.decoder = mx.zeros_like(model.decoder)
    return model


def positions(text, char="a"):
    return [t for t, c in enumerate(text) if c == char]


def hand_sigma_series(text):
    """sigma_1(0, 0) after each byte, by hand: y_0[0] x_1[0] = 7 at each 'a' whose read sum is positive."""
    a = positions(text)
    grows = [t for t in a if sum(math.cos(t - s) for s in a if s < t) > 0]
    return np.cumsum([7.0 if t in grows else 0.0 for t in range(len(text))])


TEXT = "aab a banana, a cat; aa"


def test_a_neuron_that_fires_only_on_one_byte():
    stats = activation_stats(one_byte_model(), TEXT, chunk_size=5, progress=False)
    n, n_a = len(TEXT), TEXT.count("a")
    for layer in stats["layers"]:
        assert layer["x_active"] == pytest.approx(n_a / (n * 16))
        assert layer["x_dead"] == [[0, j] for j in range(1, 16)]  # every neuron but 0 never fires
        assert layer["x_always_on"] == []
    assert stats["n_bytes"] == n

    atlas = build_atlas(one_byte_model(), TEXT, top_k=n, context=3, chunk_size=5, progress=False)
    contexts = atlas.top_contexts(0, 0, 0)
    assert sorted(c["offset"] for c in contexts) == positions(TEXT)
    assert all(c["value"] == pytest.approx(SQRT7, rel=1e-4) for c in contexts)
    assert atlas.top_contexts(1, 0, 5) == []
    assert atlas["x_rate"][0, 0, 0] == pytest.approx(n_a / n)


def test_synapse_strength_matches_the_hand_computation():
    want = hand_sigma_series(TEXT)
    assert want[-1] > 0  # the text makes the synapse grow
    sigma = synapse_state(one_byte_model(), TEXT, chunk_size=4, progress=False)
    assert set(sigma) == {(1, 0)}  # synapses start at layer 1
    assert sigma[1, 0].nnz == 1  # only the co-firing pair is stored
    assert sigma[1, 0][0, 0] == pytest.approx(want[-1], rel=1e-4)
    series = synapse_series(one_byte_model(), TEXT, [(1, 0, 0, 0)], chunk_size=4, progress=False)
    np.testing.assert_allclose(series[0], want, rtol=1e-4)


def test_synapse_state_equals_a_dense_product_of_the_activations():
    mx.random.seed(3)
    model = BDH(BDHConfig.from_preset("tiny", n_layer=3)).eval()
    text = "the quick brown fox jumps over the lazy dog. " * 4
    acts = []
    model(mx.array([list(text.encode())]), activations=acts)
    sigma = synapse_state(model, text, chunk_size=64, progress=False)
    for (layer, head), got in sigma.items():
        want = np.array(acts[layer - 1]["y"][0, head]).T @ np.array(acts[layer]["x"][0, head])
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-4, atol=1e-4)


def test_concept_synapses_rank_a_synapse_that_grows_only_on_the_concept():
    concept, other = ["aa banana aa", "a aa"], ["the cat", "no such byte"]
    found = concept_synapses(one_byte_model(), concept, other, ["xaa"], ["dog"], top=3, progress=False)
    assert len(found) == 1  # the only synapse that can grow
    best = found[0]
    assert (best["layer"], best["head"], best["i"], best["j"]) == (1, 0, 0, 0)
    rates = [hand_sigma_series(t)[-1] / len(t) for t in concept]
    assert best["gain"] == pytest.approx(np.mean(rates), rel=1e-4)
    assert best["score"] == pytest.approx(np.mean(rates) / (2 * np.mean(rates)), rel=1e-4)  # (on - 0) / (on + on)
    assert best["selectivity"] == 1.0  # held out: 7/3 per byte on "xaa", 0 on "dog"
    assert best["held_out_concept"] == pytest.approx(7 / 3, rel=1e-4)
    joined = "\n".join(concept)
    grew = [t for t, g in enumerate(np.diff(hand_sigma_series(joined), prepend=0)) if g > 0]  # all by 7
    assert len(best["contexts"]) == 3
    assert set(best["contexts"]) <= {joined[max(0, t - 24) : t] + f"[{joined[t]}]" + joined[t + 1 : t + 25]
                                     for t in grew}


def test_stats_match_a_direct_computation_over_the_whole_text():
    mx.random.seed(0)
    model = BDH(BDHConfig.from_preset("tiny")).eval()
    text = bytes(np.random.default_rng(1).integers(32, 127, 300).astype(np.uint8)).decode()
    acts = []
    model(mx.array([list(text.encode())]), activations=acts)
    stats = activation_stats(model, text, chunk_size=64, always_on=0.9, progress=False)
    assert stats["n_bytes"] == 300
    for layer, a in zip(stats["layers"], acts, strict=True):
        for kind in "xy":
            active = np.array(a[kind][0]) > 0  # (nh, T, N)
            assert layer[f"{kind}_active"] == pytest.approx(active.mean(), abs=1e-12)
            assert layer[f"{kind}_active_per_head"] == pytest.approx(active.mean(axis=(1, 2)).tolist(), abs=1e-12)
            assert layer[f"{kind}_dead"] == np.argwhere(~active.any(axis=1)).tolist()
            assert layer[f"{kind}_always_on"] == np.argwhere(active.mean(axis=1) >= 0.9).tolist()
            per_byte = active.mean(axis=(0, 2))
            assert layer[f"{kind}_active_per_byte"]["max"] == pytest.approx(per_byte.max())
            assert sum(layer[f"{kind}_active_per_byte"]["histogram"]["counts"]) == 300


def test_atlas_round_trip_and_search(tmp_path):
    text = "a cat. xxxxxxxx banana. zzz a"
    atlas = build_atlas(one_byte_model(), text, top_k=10, context=3, chunk_size=7, progress=False)
    atlas.save(tmp_path / "atlas")
    loaded = Atlas.load(tmp_path / "atlas")
    assert set(loaded.arrays) == set(atlas.arrays)
    for name, array in atlas.arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded.top_contexts(0, 0, 0, "x") == atlas.top_contexts(0, 0, 0, "x")
    assert json.loads((tmp_path / "atlas" / "atlas.json").read_text())["n_bytes"] == len(text)

    want = sum("nan" in text[max(0, p - 3) : p + 4] for p in positions(text))
    hits = loaded.search("nan", kind="x")
    assert [(h["layer"], h["head"], h["neuron"], h["matches"]) for h in hits] == [(0, 0, 0, want), (1, 0, 0, want)]
    assert loaded.search("qqq") == []
    snippet = loaded.top_contexts(0, 0, 0)[-1]["snippet"]
    assert re.fullmatch(r".*\[a\].*", snippet)


def test_atlas_bad_addresses():
    atlas = build_atlas(one_byte_model(), "abc", top_k=2, progress=False)
    with pytest.raises(InterpretError, match=r"^layer 2 out of range: the model has 2 layers \(0-1\)$"):
        atlas.top_contexts(2, 0, 0)
    with pytest.raises(InterpretError, match=r"^neuron 16 out of range: the model has 16 neurons \(0-15\)$"):
        atlas.top_contexts(0, 0, 16)
    with pytest.raises(InterpretError, match="unknown kind 'z'"):
        atlas.top_contexts(0, 0, 0, kind="z")
    with pytest.raises(InterpretError, match="the text is empty"):
        build_atlas(one_byte_model(), "", progress=False)


def graph_model(weights):
    """D = N = 8, one head, decoder = identity: G_x[i, j] = sum_d encoder[0, d, i] [d == j] = weights[i, j]."""
    model = BDH(BDHConfig(n_layer=1, n_embd=8, n_head=1, mlp_internal_dim_multiplier=1))
    model.encoder = mx.array(weights.T[None].astype(np.float32))
    model.decoder = mx.eye(8)
    return model


STAR_AND_PAIR = [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (6, 7)]  # degrees 5, 1, 1, 1, 1, 1, 1, 1


def test_a_graph_whose_degrees_are_set():
    adjacency = np.zeros((8, 8))
    for i, j in STAR_AND_PAIR[:-1]:
        adjacency[i, j] = adjacency[j, i] = 1
    adjacency[6, 7] = 1  # one way only: still a neighbour of both
    adjacency[3, 3] = 5  # a self-loop, dropped
    adjacency[2, 4] = -1  # a negative entry, dropped
    graph = neuron_graph(graph_model(adjacency), 0, "x", top_k=None, threshold=0.5)
    np.testing.assert_array_equal(graph.toarray(), np.where(adjacency > 0.5, adjacency, 0) * (1 - np.eye(8)))
    np.testing.assert_array_equal(degrees(graph), [5, 1, 1, 1, 1, 1, 1, 1])
    # Two components; undirected weights 2 (both ways) and 1 (6 -> 7), m = 11:
    # Q = sum_c L_c / m - (d_c / 2m)^2 = 10/11 - (20/22)^2 + 1/11 - (2/22)^2
    result = modularity(graph)
    assert result["n_communities"] == 2
    assert result["modularity"] == pytest.approx(10 / 11 - (20 / 22) ** 2 + 1 / 11 - (2 / 22) ** 2)


def test_top_k_keeps_the_largest_entries_of_each_row():
    weights = np.random.default_rng(0).normal(size=(8, 8))
    graph = neuron_graph(graph_model(weights), 0, "x", top_k=2).toarray()
    g = weights * (1 - np.eye(8))
    for i in range(8):
        positive = np.sort(g[i][g[i] > 0])[::-1][:2]
        np.testing.assert_allclose(np.sort(graph[i][graph[i] > 0])[::-1], positive, rtol=1e-6)


def test_power_law_fit_recovers_the_exponent():
    sample = np.random.default_rng(0).zipf(2.5, 20000)
    assert power_law_fit(sample)["alpha"] == pytest.approx(2.5, abs=0.1)
    assert power_law_fit(np.full(50, 3)) is None  # a regular graph has no tail to fit


def test_report_is_self_contained_and_lists_the_neurons_of_a_byte():
    page = build_report(one_byte_model(), "aab a", graph_top_k=2, chunk_size=3, progress=False)
    assert "http" not in page and "src=\"data:image/png;base64," in page
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert data["top"][2] == []  # 'b': nothing fires
    top_at_1 = data["top"][1]  # the second 'a': x[0] on both layers, y[0] on layer 0 (read cos(1) > 0)
    assert sorted(e[:4] for e in top_at_1) == [["x", 0, 0, 0], ["x", 1, 0, 0], ["y", 0, 0, 0], ["y", 1, 0, 0]]
    assert all(e[4] == pytest.approx(SQRT7, rel=1e-3) for e in top_at_1)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "m.npz"
    checkpoint.save(one_byte_model(), path)
    return path


def run_cli(args, capsys):
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr()


def test_inspect_writes_stats_and_report(ckpt, tmp_path, capsys):
    code, _ = run_cli(["inspect", "--checkpoint", ckpt, "--text", TEXT, "--json", tmp_path / "s.json",
                       "--out", tmp_path / "r.html", "--no-progress", "--graph-top-k", "2"], capsys)
    assert code == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["n_bytes"] == len(TEXT)
    assert stats["layers"][0]["x_active_per_head"] == [pytest.approx(TEXT.count("a") / (len(TEXT) * 16))]
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("args, message", [
    (["inspect", "--text", ""], "bdh-mlx inspect: error: the text is empty"),
    (["inspect", "--text", "a", "--synapse", "2:0:0:0"],
     "bdh-mlx inspect: error: layer 2 out of range: the model has 2 layers (0-1)"),
    (["synapses", "--text", "a", "--track", "1:0:16:0"],
     "bdh-mlx synapses: error: neuron 16 out of range: the model has 16 neurons (0-15)"),
    (["synapses", "--text", "a", "--track", "0:0:0:0"],
     "bdh-mlx synapses: error: layer 0 has no synapses: sigma_l pairs y of layer l - 1 with x of layer l"),
    (["synapses", "--text", "a", "--track", "1:x"],
     "bdh-mlx synapses: error: argument --track: must be LAYER:HEAD:I:J (four non-negative integers), got '1:x'"),
    (["inspect", "--text", "a", "--atlas", "/nonexistent"],
     "bdh-mlx inspect: error: /nonexistent: not a neuron atlas (no atlas.json)"),
    (["graphs", "--head", "1"], "bdh-mlx graphs: error: head 1 out of range: the model has 1 heads (0-0)"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, args, message):
    code, out = run_cli([*args[:1], "--checkpoint", ckpt, *args[1:]], capsys)
    assert code == 2
    assert out.err == message + "\n"


def test_neurons_command_and_empty_file(ckpt, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    code, _ = run_cli(["neurons", "--checkpoint", ckpt, "--data", tmp_path / "corpus.txt", "--out",
                       tmp_path / "atlas", "--top-k", "3", "--no-progress"], capsys)
    assert code == 0
    assert Atlas.load(tmp_path / "atlas")["x_top_values"].shape == (2, 1, 16, 3)
    code, out = run_cli(["neurons", "--checkpoint", ckpt, "--data", tmp_path / "empty.txt", "--out",
                         tmp_path / "atlas2"], capsys)
    assert (code, out.err) == (2, "bdh-mlx neurons: error: the text is empty\n")
