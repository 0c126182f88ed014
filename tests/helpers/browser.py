"""Headless Chromium for the report tests: open a self-contained HTML report as a browser would.

    dump_dom(html_path, profile)    # the DOM after load (stdout) and the console log (stderr)
    run_chromium(args, profile)     # any other headless run (e.g. --screenshot=PATH)

Images in the reports carry onerror="this.setAttribute('data-broken', '')", so a picture the browser could not
decode shows up in the dumped DOM as `data-broken=""`; a console message shows up in stderr as "CONSOLE".
Without Chromium the calling test is skipped (CI installs it: see .ci/run).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium not installed (CI: apt-get update && apt-get install -y chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def dump_dom(html_path: Path, profile: Path) -> subprocess.CompletedProcess:
    return run_chromium(["--virtual-time-budget=5000", "--run-all-compositor-stages-before-draw",
                         "--enable-logging=stderr", "--v=0", "--dump-dom", html_path.as_uri()], profile)
