"""Render an HTML report in headless Chromium and save a screenshot, to look at it as a person would.

    python examples/report_screenshot.py /tmp/bdh_inspect/report.html --out /tmp/bdh_inspect/report.png

Needs the Debian package ``chromium`` (apt-get install chromium). Nothing is fetched from the network.
"""

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def screenshot(html: Path, png: Path, size: str = "1200,1600"):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # a preloaded BLAS makes Chromium abort
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={png.resolve()}", f"--window-size={size}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120, env=env)


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
