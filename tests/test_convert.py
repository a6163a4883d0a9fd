"""Conversion to and from the official PyTorch state_dict.

The numpy-level mapping and the CLI's error handling are tested without torch. The end-to-end
round trips through real ``.pt`` files need torch: they are marked ``torch``, left out of the default
run (CI has no torch) and run with ``python -m pytest -m torch`` where torch is installed.
"""

import sys

import numpy as np
import pytest
from parity_fixtures import WEIGHT_NAMES, fixture_inputs, read_fixture

import bdh_mlx
from bdh_mlx import cli
from bdh_mlx.errors import CheckpointError
from bdh_mlx.model import BDHConfig
from bdh_mlx.storage import convert
from bdh_mlx.storage.checkpoint import read_checkpoint
from bdh_mlx.storage.convert import TORCH_MISSING, from_torch_state_dict, stored_model_args, to_torch_state_dict

OFFICIAL_KEYS = ["decoder", "encoder", "encoder_v", "lm_head", "attn.freqs", "embed.weight"]


@pytest.fixture(scope="module", params=["base", "odd_heads"])
def fixture(request):
    return read_fixture(request.param)


def official_state_dict(fixture, prefix=""):
    """The fixture's torch state_dict as numpy, in the order torch lists it."""
    return {f"{prefix}{k}": fixture[k] for k in OFFICIAL_KEYS}


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_from_torch_state_dict_infers_the_config(fixture, prefix):
    config, weights = from_torch_state_dict(
        official_state_dict(fixture, prefix), n_layer=fixture["config"]["n_layer"], dropout=0.0
    )
    assert config == BDHConfig.from_dict(fixture["config"])
    assert sorted(weights) == sorted(WEIGHT_NAMES)
    for name in WEIGHT_NAMES:
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], fixture[name])


def test_to_torch_state_dict_is_the_official_layout(fixture):
    config = BDHConfig.from_dict(fixture["config"])
    state_dict = to_torch_state_dict(config, {k: fixture[k] for k in WEIGHT_NAMES})
    stored_order = [k for k in fixture if k in OFFICIAL_KEYS]  # the fixture stores state_dict() in torch's order
    assert list(state_dict) == stored_order == OFFICIAL_KEYS
    assert state_dict["attn.freqs"].dtype == np.float32
    np.testing.assert_array_equal(state_dict["attn.freqs"], fixture["attn.freqs"])


def test_numpy_round_trip_is_bit_identical(fixture):
    config = BDHConfig.from_dict(fixture["config"])
    weights = {k: fixture[k] for k in WEIGHT_NAMES}
    back_config, back = from_torch_state_dict(to_torch_state_dict(config, weights), config.n_layer, config.dropout)
    assert back_config == config
    for name in WEIGHT_NAMES:
        assert back[name].tobytes() == weights[name].tobytes()


def _tiny_odd_state_dict():
    # n_embd 6, n_head 2, multiplier 1: N = 3, which RoPE cannot pair.
    return {"embed.weight": np.zeros((8, 6), np.float32), "encoder": np.zeros((2, 6, 3), np.float32)}


BAD_STATE_DICTS = {
    "missing": (lambda sd: sd.pop("decoder"), "weights do not match the model: missing decoder"),
    "missing embed": (lambda sd: sd.pop("embed.weight"), "not a BDH state_dict: missing embed.weight"),
    "unexpected": (lambda sd: sd.update(lm_gate=np.zeros((32, 1), np.float32)), "unexpected lm_gate"),
    "twice": (lambda sd: sd.update({"_orig_mod.decoder": sd["decoder"]}), "decoder appears twice"),
    "encoder ndim": (lambda sd: sd.update(encoder=sd["encoder"][0]), "encoder has shape (32, 64), expected 3 dim"),
    "transposed": (lambda sd: sd.update(decoder=sd["decoder"].T), "decoder has shape (32, 128), but the config"),
    "encoder_v": (lambda sd: sd.update(encoder_v=sd["encoder_v"][:1]), "encoder_v has shape (1, 32, 64)"),
    "lm_head vocab": (lambda sd: sd.update(lm_head=sd["lm_head"][:, :10]), "lm_head has shape (32, 10)"),
    "multiplier": (
        lambda sd: sd.update(encoder=sd["encoder"][..., :63], encoder_v=sd["encoder_v"][..., :63]),
        "encoder has 63 neurons per head, which no mlp_internal_dim_multiplier gives with n_embd 32 and n_head 2",
    ),
    "odd N": (lambda sd: (sd.clear(), sd.update(_tiny_odd_state_dict())), "must be even and positive for RoPE"),
    "int dtype": (lambda sd: sd.update(lm_head=sd["lm_head"].astype(np.int32)), "lm_head has dtype int32"),
    "freqs": (lambda sd: sd.update({"attn.freqs": sd["attn.freqs"][..., :8]}), "attn.freqs has shape (1, 1, 1, 8)"),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_bad_state_dicts_raise_one_clear_line(case):
    mutate, message = BAD_STATE_DICTS[case]
    state_dict = official_state_dict(read_fixture("base"))
    mutate(state_dict)
    with pytest.raises(CheckpointError) as e:
        from_torch_state_dict(state_dict, n_layer=2, source="model.pt")
    assert str(e.value).startswith("model.pt: ") and "\n" not in str(e.value)
    assert message in str(e.value)


def test_bad_depth_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=r"^model.pt: n_layer must be a positive integer, got 0$"):
        from_torch_state_dict(official_state_dict(read_fixture("base")), n_layer=0, source="model.pt")


def run_convert(argv, capsys):
    """Run ``bdh-mlx convert`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(["convert", *map(str, argv)]) or 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from-torch", "m.pt", "--out", "x.npz", "--n-layer", "0"], "--n-layer: must be a positive integer, got 0"),
        (["--from-torch", "m.pt", "--out", "x.npz", "--dropout", "1.5"],
         "--dropout: must be a number in [0, 1), got 1.5"),
        (["--from-torch", "m.pt", "--to-torch", "m.npz", "--out", "x"], "not allowed with argument --from-torch"),
        (["--out", "x"], "one of the arguments --from-torch --to-torch --to-mlx-lm is required"),
        (["--from-torch", "m.pt"], "the following arguments are required: --out"),
        (
            ["--to-torch", "m.npz", "--out", "x.pt", "--n-layer", "2"],
            "--n-layer and --dropout apply only to --from-torch",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_convert(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bdh-mlx convert: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direction", ["--from-torch", "--to-torch"])
def test_without_torch_says_how_to_install_it(direction, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    src = tmp_path / "model.npz"
    bdh_mlx.save(bdh_mlx.BDH(BDHConfig.from_preset("tiny")), src)
    code, _, err = run_convert([direction, src, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert err == f"bdh-mlx convert: error: {TORCH_MISSING}\n"
    assert 'pip install "bdh-mlx[torch]"' in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def torch_model():
    """A reference PyTorch BDH (tests/make_fixtures.py) with the odd_heads config."""
    torch = pytest.importorskip("torch")
    from make_fixtures import BDH as TorchBDH
    from make_fixtures import BDHConfig as TorchConfig

    config = {**read_fixture("odd_heads")["config"], "dropout": 0.0}
    torch.manual_seed(0)
    return torch, TorchBDH(TorchConfig(**config)).eval(), BDHConfig.from_dict(config)


@pytest.mark.torch
def test_torch_round_trip_through_the_cli(torch_model, tmp_path, capsys):
    """official-style torch model -> .pt -> --from-torch -> .npz -> --to-torch -> .pt -> strict load. Needs torch."""
    torch, model, config = torch_model
    idx, _ = fixture_inputs(read_fixture("odd_heads"))
    with torch.no_grad():
        want, _ = model(torch.from_numpy(np.array(idx)).long())
    pt, npz, back = tmp_path / "model.pt", tmp_path / "model.npz", tmp_path / "back.pt"
    torch.save(model.state_dict(), pt)

    code, out, err = run_convert(
        ["--from-torch", pt, "--out", npz, "--n-layer", config.n_layer, "--dropout", 0], capsys
    )
    assert (code, err) == (0, "") and out.startswith(f"wrote {npz}")
    mlx_model = bdh_mlx.load(npz)
    assert mlx_model.config == config
    logits, _ = mlx_model(idx)
    np.testing.assert_allclose(np.array(logits), want.numpy(), atol=1e-4, rtol=1e-4)

    code, out, err = run_convert(["--to-torch", npz, "--out", back], capsys)
    assert (code, err) == (0, "")
    state_dict = torch.load(back, map_location="cpu", weights_only=True)
    assert list(state_dict) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(state_dict[key], value), key  # attn.freqs included: bit-identical
    reloaded = type(model)(model.config).eval()
    reloaded.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(torch.from_numpy(np.array(idx)).long())[0], want)


@pytest.mark.torch
def test_torch_compiled_bf16_checkpoint_under_model(torch_model, tmp_path, capsys):
    """A training checkpoint: bf16 weights, ``_orig_mod.`` keys, under "model". Needs torch."""
    torch, model, config = torch_model
    wrapped = {"model": {f"_orig_mod.{k}": v.bfloat16() for k, v in model.state_dict().items()}, "step": 7}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    code, _, err = run_convert(["--from-torch", tmp_path / "ckpt.pt", "--out", tmp_path / "m.npz", "--n-layer", 3],
                               capsys)
    assert (code, err) == (0, "")
    converted, weights = read_checkpoint(tmp_path / "m.npz")
    assert converted == BDHConfig.from_dict({**config.to_dict(), "n_layer": 3, "dropout": 0.1})  # default dropout
    assert sorted(weights) == sorted(WEIGHT_NAMES)
    for name in WEIGHT_NAMES:
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], model.state_dict()[name].bfloat16().float().numpy())


@pytest.mark.torch
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda torch, model, path: path.write_bytes(b"not a torch file" * 8), "not a plain state_dict"),
        (lambda torch, model, path: torch.save(model, path), "not a plain state_dict"),
        (lambda torch, model, path: torch.save([1, 2], path), "not a state_dict (a dict of tensors"),
        (lambda torch, model, path: torch.save({"model": {"step": 1}}, path), "not a state_dict (a dict of tensors"),
        (lambda torch, model, path: path.write_bytes(open(path.parent / "x.pt", "rb").read()[:300]), "not a"),
        (lambda torch, model, path: path.mkdir(), "not a file"),
        (lambda torch, model, path: None, "no such file"),
    ],
)
def test_bad_torch_files_exit_2_with_one_line(torch_model, tmp_path, capsys, make, message):
    """Needs torch."""
    torch, model, _ = torch_model
    torch.save(model.state_dict(), tmp_path / "x.pt")
    src, out = tmp_path / "src.pt", tmp_path / "out.npz"
    make(torch, model, src)
    code, _, err = run_convert(["--from-torch", src, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"bdh-mlx convert: error: {src}: ")
    assert message in err
    assert not out.exists()


@pytest.mark.torch
def test_written_freqs_are_torch_own_for_large_n(torch_model):
    """torch's float32 pow is not correctly rounded: the .pt writer uses torch's values. Needs torch."""
    torch, _, _ = torch_model
    from make_fixtures import get_freqs

    from bdh_mlx.model import rope_frequencies
    from bdh_mlx.storage.convert import official_freqs

    n = 8192  # N of the 25m preset
    want = get_freqs(n, theta=2**16, dtype=torch.float32).view(1, 1, 1, n)
    assert torch.equal(official_freqs(torch, n), want)
    np.testing.assert_array_max_ulp(np.array(rope_frequencies(n)), want.numpy().ravel(), maxulp=4)


def fake_torch_file(monkeypatch, tmp_path, model_args):
    """A .pt stand-in: ``load_torch_checkpoint`` returns the base fixture's weights and ``model_args``."""
    monkeypatch.setattr(convert, "load_torch_checkpoint", lambda path: (official_state_dict(read_fixture("base")),
                                                                        model_args))
    monkeypatch.chdir(tmp_path)
    return ["--from-torch", "m.pt", "--out", "m.npz"]


def test_from_torch_needs_n_layer_unless_the_file_stores_it(monkeypatch, tmp_path, capsys):
    argv = fake_torch_file(monkeypatch, tmp_path, {})
    code, out, err = run_convert(argv, capsys)
    assert (code, out) == (2, "")
    assert err == ("bdh-mlx convert: error: m.pt: the number of layers is not stored in a state_dict (the weights are "
                   "shared by all layers); give --n-layer, the depth the model was trained with\n")
    assert list(tmp_path.iterdir()) == []
    assert run_convert([*argv, "--n-layer", "3"], capsys)[0] == 0
    assert read_checkpoint(tmp_path / "m.npz")[0].n_layer == 3


def test_from_torch_takes_a_stored_config(monkeypatch, tmp_path, capsys):
    argv = fake_torch_file(monkeypatch, tmp_path, {"n_layer": 4, "dropout": 0.0, "n_embd": 999})
    assert run_convert(argv, capsys)[0] == 0
    config = read_checkpoint(tmp_path / "m.npz")[0]
    assert (config.n_layer, config.dropout, config.n_embd) == (4, 0.0, read_fixture("base")["embed.weight"].shape[1])
    assert run_convert([*argv, "--n-layer", "2", "--dropout", "0.3"], capsys)[0] == 0  # the flags win
    assert read_checkpoint(tmp_path / "m.npz")[0].n_layer == 2


def test_stored_model_args():
    assert stored_model_args({"model": {}, "model_args": {"n_layer": 4}}) == {"n_layer": 4}  # nanoGPT
    assert stored_model_args({"config": {"n_layer": 5, "lr": 1}}) == {"n_layer": 5, "lr": 1}
    assert stored_model_args({"config": {"lr": 1}}) == {}
    assert stored_model_args({"encoder": np.zeros(3)}) == {}
    assert stored_model_args([1, 2]) == {}


def test_non_finite_torch_weights_are_refused():
    state_dict = official_state_dict(read_fixture("base"))
    state_dict["decoder"] = np.where(np.arange(state_dict["decoder"].size) == 7, np.inf, 0.0).reshape(
        state_dict["decoder"].shape
    )
    with pytest.raises(CheckpointError, match=r"^model.pt: decoder holds NaN or infinite values"):
        from_torch_state_dict(state_dict, n_layer=2, source="model.pt")


@pytest.mark.torch
def test_torch_checkpoint_with_model_args(torch_model, tmp_path, capsys):
    """A nanoGPT-style training checkpoint carries its config: no --n-layer needed. Needs torch."""
    torch, model, config = torch_model
    torch.save({"model": model.state_dict(), "model_args": {"n_layer": 3, "dropout": 0.0}}, tmp_path / "ckpt.pt")
    code, _, err = run_convert(["--from-torch", tmp_path / "ckpt.pt", "--out", tmp_path / "m.npz"], capsys)
    assert (code, err) == (0, "")
    assert read_checkpoint(tmp_path / "m.npz")[0] == BDHConfig.from_dict({**config.to_dict(), "n_layer": 3})
