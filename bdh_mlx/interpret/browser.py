"""Headless Chromium on a local HTML file: a screenshot, or the page's DOM after its script ran. Nothing is
fetched from the network: the page is a file:// URL and background networking is off."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .common import InterpretError

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(html, *action: str, size: str = "1200,1600", timeout: int = 120) -> str:
    """Chromium's stdout for ``action`` (e.g. ``--dump-dom``) on the file ``html``, with a new empty profile."""
    browser = chromium()
    if browser is None:
        raise InterpretError("chromium not found: apt-get install chromium")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # a preloaded BLAS makes Chromium abort
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", *action,
                               Path(html).resolve().as_uri()], capture_output=True, timeout=timeout, env=env,
                              text=True)
    if done.returncode != 0:
        raise InterpretError(f"chromium failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def screenshot(html, png, size: str = "1200,1600"):
    """Render ``html`` to the PNG file ``png``."""
    run_chromium(html, f"--screenshot={Path(png).resolve()}", size=size)


def rendered_dom(html) -> str:
    """The page's DOM after its script ran (``--dump-dom``)."""
    return run_chromium(html, "--dump-dom")
