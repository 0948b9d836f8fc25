"""Screenshot of a built page for the README (needs `make book` first).

.venv/bin/python benchmarks/screenshot.py [chapters/01_introduction.html] [out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    page_path = sys.argv[1] if len(sys.argv) > 1 else "chapters/01_introduction.html"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "book" / "figures" / "screenshot.png"
    url = (ROOT / "_build" / "html" / page_path).as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="networkidle")
        page.wait_for_timeout(1500)  # let MathJax typeset
        page.screenshot(path=str(out))
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
