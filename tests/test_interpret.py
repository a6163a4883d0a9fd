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
    Moments,
    activation_stats,
    build_atlas,
    build_report,
    byte_activity,
    changing_synapses,
    concept_synapses,
    degree_preserving_shuffle,
    degrees,
    modularity,
    neuron_graph,
    power_law_fit,
    stream_activations,
    synapse_series,
    synapse_state,
)
from bdh_mlx.interpret.graphs import sparsification
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
        assert layer["x_silent"] == [[0, j] for j in range(1, 16)]  # every neuron but 0 never fires
        assert layer["x_always_on"] == []
    assert stats["n_bytes"] == n
    assert stats["dead"] is False  # 23 bytes: "did not fire in these bytes", not dead

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
    # damped Welch t: (mean - 0) / (sqrt(var / 2 + 0) + 0.1 mean), the variance over the 2 texts (ddof 1)
    want = np.mean(rates) / (math.sqrt(np.var(rates, ddof=1) / 2) + 0.1 * np.mean(rates))
    assert best["score"] == pytest.approx(want, rel=1e-4)
    assert best["selectivity"] == 1.0  # held out: 7/3 per byte on "xaa", 0 on "dog"
    assert best["selectivity_ci"] == [1.0, 1.0]  # every resample of 1 vs 1 text is the same
    assert (best["n_held_out_concept"], best["n_held_out_other"]) == (1, 1)
    assert best["warning"] == ("only 1 vs 1 held-out texts (fewer than 10 a side): too few for the selectivity "
                               "to mean much")
    assert best["held_out_concept"] == pytest.approx(7 / 3, rel=1e-4)
    grew = [text[max(0, t - 24) : t] + f"[{text[t]}]" + text[t + 1 : t + 25]  # each text on its own: no snippet
            for text in concept for t, g in enumerate(np.diff(hand_sigma_series(text), prepend=0)) if g > 0]
    assert len(grew) == 2 and sorted(best["contexts"]) == sorted(grew)  # fewer growth points than 3 asked for


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
            assert layer[f"{kind}_silent"] == np.argwhere(~active.any(axis=1)).tolist()
            assert layer[f"{kind}_always_on"] == np.argwhere(active.mean(axis=1) >= 0.9).tolist()
            per_byte = active.mean(axis=(0, 2))
            assert layer[f"{kind}_active_per_byte"]["max"] == pytest.approx(per_byte.max())
            assert sum(layer[f"{kind}_active_per_byte"]["histogram"]["counts"]) == 300
            assert layer[f"{kind}_active_per_byte"]["n"] == 300


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
    graph = neuron_graph(graph_model(weights), 0, "x", top_k=2)
    g = weights * (1 - np.eye(8))
    for i in range(8):
        positive = np.sort(g[i][g[i] > 0])[::-1][:2]
        np.testing.assert_allclose(np.sort(graph[i].data)[::-1], positive, rtol=1e-6)
    assert degrees(graph).min() >= 2  # the bound the sparsification's description states
    assert sparsification(top_k=2).endswith("no degree is below 2 and the distribution's low end is set by the cut")


def test_a_global_cut_keeps_the_largest_entries_of_the_whole_matrix():
    weights = np.random.default_rng(1).normal(size=(8, 8))
    graph = neuron_graph(graph_model(weights), 0, "x", edges=5).toarray()
    g = weights * (1 - np.eye(8))
    fifth = np.sort(g.ravel())[-5]
    np.testing.assert_allclose(graph, np.where(g >= fifth, g, 0), rtol=1e-6)
    assert (graph > 0).sum() == 5
    with pytest.raises(InterpretError, match="give one of edges, top_k or threshold"):
        neuron_graph(graph_model(weights), 0, "x", top_k=2, edges=5)


def test_a_degree_preserving_shuffle_keeps_every_degree_and_rewires():
    rng = np.random.default_rng(2)
    weights = (rng.random((8, 8)) < 0.4).astype(float)
    graph = neuron_graph(graph_model(weights), 0, "x", threshold=0.5)
    shuffled = degree_preserving_shuffle(graph, seed=0)
    by_hand = ((weights + weights.T) * (1 - np.eye(8)) > 0).sum(axis=1)
    assert [d for _, d in sorted(shuffled.degree())] == by_hand.tolist()
    assert set(shuffled.edges()) != {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(weights + weights.T, 1)),
                                                                       strict=True)}


def test_power_law_fit_recovers_the_exponent_and_compares_the_alternatives():
    rng = np.random.default_rng(0)
    fit = power_law_fit(rng.zipf(2.5, 5000))
    assert fit["alpha"] == pytest.approx(2.5, abs=0.1)
    assert fit["compare"]["exponential"]["R"] > 0 and fit["compare"]["exponential"]["p"] < 0.01
    assert power_law_fit(np.full(50, 3))["alpha"] is None  # a regular graph has no tail to fit
    # 500 degrees of 5 and a handful above: the likelihood keeps rising towards alpha = infinity
    bounded = power_law_fit(np.array([5] * 500 + [6] * 3 + [7, 8]))
    assert bounded["alpha"] is None
    assert bounded["note"] == "the fit stopped at a bound of alpha in [1, 10] (reached 10.00): no estimate"
    exponential = power_law_fit(np.ceil(rng.exponential(20, 3000)).astype(int), min_tail=2000)
    assert exponential["compare"]["exponential"]["R"] < 0 and exponential["compare"]["exponential"]["p"] < 0.05


def test_report_is_self_contained_and_lists_the_neurons_of_a_byte():
    text = "aab a"
    page = build_report(one_byte_model(), text, graph_edges=2, chunk_size=3, progress=False)
    assert "http" not in page and "src=\"data:image/png;base64," in page
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert data["top"][2] == []  # 'b': nothing fires
    top_at_1 = data["top"][1]  # the second 'a': x[0] on both layers, y[0] on layer 0 (read cos(1) > 0)
    assert sorted(e[:4] for e in top_at_1) == [["x", 0, 0, 0], ["x", 1, 0, 0], ["y", 0, 0, 0], ["y", 1, 0, 0]]
    assert all(e[4] == pytest.approx(SQRT7, rel=1e-3) for e in top_at_1)
    # x[0] fires sqrt(7) on 3 of 5 bytes: z = (sqrt7 - mean) / std, std over the 5 bytes, fires on 60%
    x = np.array([SQRT7 if c == "a" else 0 for c in text])
    assert [e[5:] for e in top_at_1 if e[0] == "x"] == [
        [pytest.approx((SQRT7 - x.mean()) / x.std(), abs=0.01), 0.6]] * 2


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
                       "--out", tmp_path / "r.html", "--no-progress", "--graph-edges", "2"], capsys)
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


def tiny_model(seed=0):
    mx.random.seed(seed)
    return BDH(BDHConfig.from_preset("tiny", dropout=0.0)).eval()


def dense_activations(model, text):
    acts = []
    model(mx.array([list(text.encode())]), activations=acts)
    return [{k: np.array(a[k][0], np.float64) for k in "xy"} for a in acts]  # (nh, T, N)


SAMPLE = bytes(np.random.default_rng(1).integers(32, 127, 200).astype(np.uint8)).decode()


def test_neurons_of_a_byte_are_ranked_by_z_score_without_the_always_on_ones():
    model = tiny_model()
    chunks = [acts for _, acts in stream_activations(model, SAMPLE, chunk_size=64, progress=False)]
    acts = [{k: np.concatenate([c[layer][k] for c in chunks], axis=1) for k in "xy"} for layer in range(2)]
    moments = Moments(model.config)
    activation_stats(model, SAMPLE, chunk_size=64, progress=False, moments=moments)
    activity = byte_activity(model, SAMPLE, moments, top=1024, chunk_size=64, progress=False)  # all that fire
    values = {k: np.stack([a[k] for a in acts]) for k in "xy"}  # (L, nh, T, N)
    rate = {k: (v > 0).mean(axis=2, keepdims=True) for k, v in values.items()}
    assert (rate["y"] >= 0.99).any()  # the case has always-on neurons to leave out
    with np.errstate(invalid="ignore", divide="ignore"):  # silent neurons: std 0, never ranked
        z = {k: (v - v.mean(axis=2, keepdims=True)) / v.std(axis=2, keepdims=True) for k, v in values.items()}
    for t in (0, 57, 199):
        candidates = sorted(((float(z[k][layer, h, t, n]), k, layer, h, n) for k in "xy"
                             for layer, h, n in np.argwhere((values[k][:, :, t] > 0) & (rate[k][:, :, 0] < 0.99))),
                            reverse=True)
        got = activity["top"][t]
        assert len(got) == len(candidates) > 20
        assert sorted(e[:4] for e in got) == sorted([k, int(layer), int(h), int(n)] for _, k, layer, h, n in candidates)
        assert [e[5] for e in got] == pytest.approx([c[0] for c in candidates], abs=0.01)  # in order of z
    np.testing.assert_allclose(moments.std("x"), values["x"].std(axis=2), rtol=1e-4, atol=1e-6)


def test_changing_synapses_rank_the_coefficient_of_variation_of_the_increments():
    model = tiny_model(1)
    acts = dense_activations(model, SAMPLE)
    skip, min_steps = 32, 20
    found = changing_synapses(model, SAMPLE, top=4, min_steps=min_steps, chunk_size=64, progress=False, skip=skip)
    want = []
    for layer in range(1, model.config.n_layer):
        for h in range(model.config.n_head):
            inc = acts[layer - 1]["y"][h][skip:, :, None] * acts[layer]["x"][h][skip:, None, :]  # (T, N, N)
            steps = (inc > 0).sum(axis=0)
            cv = inc.std(axis=0) / np.where(steps > 0, inc.mean(axis=0), 1)
            want += [(cv[i, j], layer, h, i, j, steps[i, j]) for i, j in np.argwhere(steps >= min_steps)]
    want = sorted(want, reverse=True)[:4]
    assert [f[:4] for f in found] == [(layer, h, int(i), int(j)) for _, layer, h, i, j, _ in want]
    assert [f[4] for f in found] == pytest.approx([w[0] for w in want], rel=1e-3)
    assert [f[5] for f in found] == [w[5] for w in want]


def test_auc_and_its_bootstrap_interval_against_independent_formulas():
    from scipy.stats import mannwhitneyu

    from bdh_mlx.interpret.synapses import auc, auc_interval

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1, 40), rng.normal(0.0, 1, 40)
    a = auc(pos, neg)
    assert a == pytest.approx(mannwhitneyu(pos, neg).statistic / (40 * 40))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)  # Hanley & McNeil (1982): the AUC's normal approximation
    se = math.sqrt((a * (1 - a) + 39 * (q1 - a * a) + 39 * (q2 - a * a)) / (40 * 40))
    low, high = auc_interval(pos, neg)
    assert low == pytest.approx(a - 1.96 * se, abs=0.03)
    assert high == pytest.approx(a + 1.96 * se, abs=0.03)
    assert auc_interval([1.0, 2.0], [0.0, 0.5]) == (1.0, 1.0)  # separated in every resample


def test_silent_neurons_are_dead_only_over_enough_bytes():
    from bdh_mlx.interpret.stats import silent_meaning

    assert silent_meaning(11) == "did not fire in these 11 bytes (fewer than 10,000: too few to call them dead)"
    assert silent_meaning(10_000) == "dead (never fired in 10,000 bytes)"
    stats = activation_stats(one_byte_model(1), "b" * 10_000, chunk_size=2048, progress=False)
    assert stats["dead"] is True and len(stats["layers"][0]["x_silent"]) == 16


def test_the_built_in_corpus_is_the_default_text(ckpt, tmp_path, capsys):
    from bdh_mlx.training.data import default_corpus_bytes

    corpus = default_corpus_bytes()[:300]
    code, out = run_cli(["neurons", "--checkpoint", ckpt, "--out", tmp_path / "atlas", "--max-bytes", 300,
                         "--no-progress"], capsys)
    assert code == 0
    atlas = Atlas.load(tmp_path / "atlas")
    assert atlas.meta["n_bytes"] == 300 and atlas.meta["source"] == "the built-in corpus (pydoc_data)"
    assert atlas["x_rate"][0, 0, 0] == pytest.approx(corpus.count(b"a") / 300)
    code, out = run_cli(["inspect", "--checkpoint", ckpt, "--max-bytes", 300, "--json", tmp_path / "s.json",
                         "--no-progress"], capsys)
    assert code == 0 and out.out.startswith("300 bytes of the built-in corpus (pydoc_data)\n")
    layer = json.loads((tmp_path / "s.json").read_text())["layers"][0]
    assert layer["x_active"] == pytest.approx(corpus.count(b"a") / (300 * 16))
    code, out = run_cli(["synapses", "--checkpoint", ckpt, "--max-bytes", 300, "--track", "1:0:0:0",
                         "--no-progress"], capsys)
    assert code == 0 and out.out.startswith("300 bytes of the built-in corpus (pydoc_data)\n")


@pytest.mark.parametrize("command", ["graphs --plot d.png", "inspect --out r.html", "synapses --plot s.png"])
def test_a_missing_extra_is_one_line_naming_the_install(ckpt, capsys, monkeypatch, command):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    name, *rest = command.split()
    text = [] if name == "graphs" else ["--text", "a"]
    code, out = run_cli([name, "--checkpoint", ckpt, *text, *rest], capsys)
    assert (code, out.err) == (2, f'bdh-mlx {name}: error: this needs matplotlib, which is not installed: '
                                  'pip install "bdh-mlx[interpret]"\n')


def test_graphs_read_a_quantized_checkpoint_through_its_dequantized_weights():
    from bdh_mlx import quantize
    from bdh_mlx.interpret.graphs import head_weights

    model = tiny_model(2)
    N = model.config.n_neurons
    want = {k: (np.array(getattr(model, name)[1]), np.array(model.decoder[N : 2 * N]))
            for k, name in (("x", "encoder"), ("y", "encoder_v"))}
    quantize(model, bits=8, group_size=32)
    for kind, (encoder, decoder) in want.items():
        got_encoder, got_decoder = head_weights(model, 1, kind)
        np.testing.assert_allclose(got_encoder, encoder, atol=0.01 * np.abs(encoder).max())  # 8 bits: 1/255 steps
        np.testing.assert_allclose(got_decoder, decoder, atol=0.01 * np.abs(decoder).max())
