"""Commands that write files, on a full disk (a small tmpfs): one line, exit 2, and nothing half-written."""

import pytest
from test_faults import small_disk  # noqa: F401  (the tmpfs fixture)

from bdh_mlx import BDH, BDHConfig, cli, quantize, save

CASES = [
    ["quantize", "--checkpoint", "{ckpt}", "--bits", "8", "--out", "{disk}/q.npz"],
    ["merge", "{ckpt}", "{ckpt}", "--out", "{disk}/m.npz"],
    ["generate", "--model", "{ckpt}", "--prompt", "hi", "-m", "2", "--save-cache", "{disk}/c.npz"],
    ["neurons", "--checkpoint", "{ckpt}", "--data", "{text}", "--out", "{disk}/atlas", "--no-progress"],
    ["graphs", "--checkpoint", "{q4}", "--json", "{disk}/g.json", "--plot", "{disk}/g.png"],
    ["inspect", "--checkpoint", "{q4}", "--text", "hello", "--no-progress", "--json", "{disk}/s.json"],
    ["upload", "--checkpoint", "{ckpt}", "--repo", "org/name", "--dry-run", "{disk}/up"],
    pytest.param(["convert", "--to-torch", "{ckpt}", "--out", "{disk}/m.pt"], marks=pytest.mark.torch),
]


@pytest.mark.parametrize("argv", CASES, ids=lambda argv: argv[0])
def test_a_full_disk_is_one_line_and_leaves_no_file(argv, small_disk, tmp_path, capsys):  # noqa: F811
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8))
    save(model, tmp_path / "tiny.npz")
    save(quantize(model, bits=4), tmp_path / "q4.npz")
    (tmp_path / "text.txt").write_text("hello there " * 20)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave a few KB: every file these commands write is larger
        try:
            f.write(b"\0" * (1500 * 1024 - 4096))
        except OSError:
            pass
    paths = {"ckpt": tmp_path / "tiny.npz", "q4": tmp_path / "q4.npz", "text": tmp_path / "text.txt",
             "disk": small_disk}
    assert cli.main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bdh-mlx {argv[0]}: error: ") and "No space left on device" in err
    left = sorted(p.name for p in small_disk.rglob("*") if p.is_file() and p != filler)
    assert left == []
