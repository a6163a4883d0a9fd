"""Render an HTML report in headless Chromium and save a screenshot, to look at it as a person would.

    python examples/report_screenshot.py /tmp/bdh_inspect/report.html --out /tmp/bdh_inspect/report.png

Needs the Debian package ``chromium`` (apt-get install chromium). Nothing is fetched from the network.
"""

import argparse
import tempfile
from pathlib import Path

from bdh_mlx.interpret.browser import screenshot


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bdh_report.png")
    parser.add_argument("--size", default="1200,1600", help="window width,height")
    args = parser.parse_args()
    screenshot(args.html, args.out, args.size)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
