"""The book: built once (which executes every chapter on the default model, so a failing
assertion in a chapter fails here), then every page opened in headless Debian Chromium."""

from __future__ import annotations

import functools
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
CHROMIUM = "/usr/bin/chromium"
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9]*.md"))

pytestmark = pytest.mark.book


@functools.cache
def build() -> subprocess.CompletedProcess:
    jb = Path(sys.executable).parent / "jupyter-book"
    return subprocess.run(
        [str(jb), "build", str(ROOT), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=3000,
    )


@pytest.fixture(scope="module")
def site():
    proc = build()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return HTML


def test_book_builds_with_warnings_as_errors(site):
    assert (site / "index.html").exists()


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_colab_notebook_is_in_sync_with_its_myst_source(chapter):
    import jupytext

    md = jupytext.read(chapter)
    ipynb_path = chapter.with_suffix(".ipynb")
    assert ipynb_path.exists(), f"run `make notebooks` to create {ipynb_path.name}"
    nb = jupytext.read(ipynb_path)
    src = lambda n: [(c.cell_type, c.source) for c in n.cells]  # noqa: E731
    assert src(md) == src(nb), f"{ipynb_path.name} is stale: run `make notebooks`"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_was_executed_without_errors(site, chapter):
    page = site / "chapters" / (chapter.stem + ".html")
    html = page.read_text()
    assert "cell_output" in html and "Traceback" not in html
    assert "<img" in html  # its figures were plotted


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name not in {"search.html", "genindex.html"})


@pytest.fixture(scope="module")
def browser(site):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def test_every_page_in_a_real_browser(site, browser):
    """Each page loads without errors, its images render, its math renders, and every
    internal link points at an existing page and anchor."""
    problems: list[str] = []
    anchors: dict[Path, set[str]] = {}
    links: list[tuple[Path, str]] = []
    for html in _pages(site):
        errors: list[str] = []
        page = browser.new_page()
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.goto(html.as_uri(), wait_until="load")
        page.wait_for_timeout(300)
        rel = html.relative_to(site)
        if errors:
            problems.append(f"{rel}: page errors {errors}")
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.src)"
        )
        if broken:
            problems.append(f"{rel}: images not rendered {broken}")
        if page.locator(".math").count():
            page.wait_for_function(
                "document.querySelectorAll('mjx-container').length > 0", timeout=20000
            )
            raw = page.evaluate(
                "Array.from(document.querySelectorAll('.math'))"
                ".filter(m => !m.querySelector('mjx-container')).length"
            )
            if raw:
                problems.append(f"{rel}: {raw} math blocks not rendered by MathJax")
        anchors[html.resolve()] = set(
            page.evaluate("Array.from(document.querySelectorAll('[id]')).map(e => e.id)")
        )
        for href in page.evaluate(
            "Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
        ):
            if href.startswith("file://"):
                links.append((html, href))
        page.close()
    for source, href in links:
        url = urllib.parse.urlparse(href)
        target = Path(urllib.parse.unquote(url.path)).resolve()
        if not target.exists():
            problems.append(f"{source.relative_to(site)}: broken link {href}")
        elif url.fragment and target in anchors and url.fragment not in anchors[target]:
            problems.append(
                f"{source.relative_to(site)}: missing anchor #{url.fragment} in {target.name}"
            )
    assert not problems, "\n".join(problems)


def test_chapter_one_shows_its_figures_and_math(site, browser):
    page = browser.new_page()
    page.goto((site / "chapters" / "01_introduction.html").as_uri(), wait_until="load")
    page.wait_for_function("document.querySelectorAll('mjx-container').length > 3", timeout=20000)
    sizes = page.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
    assert sum(w > 300 and h > 150 for w, h in sizes) >= 4  # plotted figures, not icons
    text = page.inner_text("main")
    assert "Exercise 1.1" in text and "Efficiency" in text
    _solutions_are_not_on_the_page(page, text)
    page.close()


def _solutions_are_not_on_the_page(page, text):
    """Solutions live in the package (``show_solution``), not in (hidden) page blocks, which
    Colab would show: the page says how to reveal them and holds no solution block."""
    assert "show_solution(" in text
    assert page.locator("details.hide", has_text="Solution").count() == 0
    assert "# Solution" not in page.content()


def test_chapter_four_shows_traces_results_and_no_solutions(site, browser):
    page = browser.new_page()
    page.goto((site / "chapters" / "04_rome.html").as_uri(), wait_until="load")
    page.wait_for_function("document.querySelectorAll('mjx-container').length > 3", timeout=20000)
    sizes = page.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
    assert sum(w > 300 and h > 150 for w, h in sizes) >= 2  # heatmaps and effect curves
    text = page.inner_text("main")
    assert "Exercise 4.1" in text and "Exercise 4.2" in text and "r-ROME" in text
    assert "ROME edit in" in text and "MEMIT" in text and "paper GPT-2 XL" in text
    _solutions_are_not_on_the_page(page, text)
    page.close()


def test_checks_run_out_of_the_readers_view(site, browser):
    """The asserts that make a chapter a test run in removed cells: no code cell the reader
    sees holds one (nor the page's own run time)."""
    shown = []
    for html in sorted((site / "chapters").glob("*.html")):
        page = browser.new_page()
        page.goto(html.as_uri(), wait_until="load")
        for code in page.locator("div.cell_input").all_inner_texts():
            for line in code.splitlines():
                if line.strip().startswith("assert ") or "page ran in" in line:
                    shown.append(f"{html.name}: {line.strip()[:80]}")
        page.close()
    assert not shown, "\n".join(shown)
