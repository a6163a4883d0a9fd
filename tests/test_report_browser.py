"""The HTML report rendered by a real browser (headless Chromium, no network): its script runs and it draws.

Skipped where no Chromium is installed (``apt-get install chromium``)."""

import math
import re

import numpy as np
import pytest
from test_interpret import one_byte_model

from bdh_mlx.interpret import write_report
from bdh_mlx.interpret.browser import chromium, rendered_dom, screenshot

pytestmark = pytest.mark.skipif(chromium() is None, reason="no chromium installed (apt-get install chromium)")


def test_the_report_runs_its_script_and_draws_in_chromium(tmp_path):
    text = "a banana and a cat"
    write_report(tmp_path / "r.html", one_byte_model(), text, graph_edges=2, chunk_size=8, progress=False)
    dom = rendered_dom(tmp_path / "r.html")
    neurons = re.search(r'<div id="neurons">(.*?)</div>', dom, re.S).group(1)
    # the script selected the first byte ('a') and listed its neurons: x[0] in both layers (y reads nothing yet);
    # x[0] fires sqrt(7) on the 7 "a" of 18 bytes (p = 7/18): z = (1 - p) / sqrt(p (1 - p)) = sqrt(11 / 7)
    assert neurons.startswith('byte 0 ("a"): <table>')
    cell = f"<td>{math.sqrt(7):.3f}</td><td>{math.sqrt(11 / 7):.1f}</td><td>{100 * 7 / 18:.1f}%</td>"
    assert neurons.count("<tr>") == 1 + 2 and neurons.count(cell) == 2
    screenshot(tmp_path / "r.html", tmp_path / "r.png", size="1000,700")
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "r.png")[..., :3]
    shaded = (pixels[..., 0] > 0.9) & (pixels[..., 1] > 0.45) & (pixels[..., 1] < 0.85) & (pixels[..., 2] < 0.6)
    assert shaded.sum() > 50  # the text's orange shading is on screen
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # and more than a blank page
