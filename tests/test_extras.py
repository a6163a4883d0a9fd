"""A command that needs an optional package that is not installed says which pip install brings it, in one line,
exit 2; one that does not need it runs without it. A package is made missing by putting None in sys.modules, which
makes importing it fail (and ``importlib.util.find_spec``, which the interpret commands' ``require`` asks, find
nothing)."""

import sys

import pytest
from conftest import TINY_RUN

from bdh_mlx import BDH, BDHConfig, cli
from bdh_mlx.storage import checkpoint

INTERPRET = 'pip install "bdh-mlx[interpret]"'
PLOT = "pip install 'bdh-mlx[plot]'"


def needs(name, pip):
    return f"this needs {name}, which is not installed: {pip}"


CASES = {  # command line, the missing package, the message (None: the command does not need it and runs)
    # the interpret commands check their packages up front: every one names the interpret extra
    "inspect": (["inspect", "--checkpoint", "{ckpt}", "--text", "hi", "--no-progress", "--out", "{tmp}/r.html"],
                "scipy", needs("scipy", INTERPRET)),
    "neurons": (["neurons", "--checkpoint", "{ckpt}", "--data", "{tmp}/d.txt", "--no-progress", "--out",
                 "{tmp}/atlas"], "scipy", None),  # an atlas needs numpy only
    "inspect-json": (["inspect", "--checkpoint", "{ckpt}", "--text", "hi", "--no-progress", "--json", "{tmp}/s.json"],
                     "scipy", None),  # statistics without a report need numpy only
    "synapses": (["synapses", "--checkpoint", "{ckpt}", "--text", "hi", "--no-progress"], "scipy",
                 needs("scipy", INTERPRET)),
    "synapses-plot": (["synapses", "--checkpoint", "{ckpt}", "--text", "hi", "--no-progress", "--track", "1:0:0:0",
                       "--plot", "{tmp}/s.png"], "matplotlib", needs("matplotlib", INTERPRET)),
    "graphs": (["graphs", "--checkpoint", "{ckpt}"], "networkx", needs("networkx", INTERPRET)),
    "graphs-powerlaw": (["graphs", "--checkpoint", "{ckpt}"], "powerlaw", needs("powerlaw", INTERPRET)),
    "graphs-plot": (["graphs", "--checkpoint", "{ckpt}", "--plot", "{tmp}/d.png"], "matplotlib",
                    needs("matplotlib", INTERPRET)),
    "inspect-report": (["inspect", "--checkpoint", "{ckpt}", "--text", "hi", "--no-progress", "--out", "{tmp}/r.html"],
                       "matplotlib", needs("matplotlib", INTERPRET)),
    "plot": (["plot", "{tmp}"], "matplotlib", f"plotting needs matplotlib: {PLOT}"),
    "convert": (["convert", "--to-torch", "{ckpt}", "--out", "{tmp}/m.pt"], "torch",
                'PyTorch is needed to read or write .pt files: pip install "bdh-mlx[torch]" (or pip install torch)'),
    "train-wandb": (["train", *TINY_RUN, "--steps", "1", "--out", "{tmp}/run", "--wandb", "p"], "wandb",
                    "--wandb needs the wandb package: pip install wandb"),
    "train-yaml": (["train", "--config", "{tmp}/c.yaml"], "yaml",
                   "{tmp}/c.yaml: YAML config files need pyyaml (pip install pyyaml)"),
    "train-dataset": (["train", *TINY_RUN, "--dataset", "{tmp}/d.txt", "--out", "{tmp}/run"], "datasets",
                      needs("datasets", "pip install datasets")),
}


@pytest.fixture
def without(monkeypatch):
    """``without(name)``: importing ``name`` (and its submodules) fails until the test ends; bdh_mlx's modules
    that import it at the top are imported afresh."""

    def block(name):
        for module in [m for m in sys.modules if m.startswith((f"{name}.", "bdh_mlx.interpret"))]:
            monkeypatch.delitem(sys.modules, module)
        monkeypatch.setitem(sys.modules, name, None)

    return block


@pytest.mark.parametrize("case", CASES)
def test_a_missing_optional_package_is_one_line_with_its_pip_install(case, tmp_path, without, capsys):
    argv, name, message = CASES[case]
    ckpt = tmp_path / "tiny.npz"
    checkpoint.save(BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)), ckpt)
    (tmp_path / "c.yaml").write_text("steps: 1\n")
    (tmp_path / "d.txt").write_text("some text " * 100)
    without(name)
    code = cli.main([a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    command = argv[0]
    if message is None:  # runs without it
        assert (code, err) == (0, "")
    else:
        assert (code, err) == (2, f"bdh-mlx {command}: error: {message.format(tmp=tmp_path)}\n")
