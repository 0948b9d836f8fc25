"""Sphinx extension: drop repeated <script> tags from the <head> of every built page.

sphinx-thebe 0.3.1 and sphinx-togglebutton register their inline scripts again on events
that jupyter-book's build fires more than once (with different priorities, so Sphinx's own
duplicate check lets them through). Each page then declared ``const THEBE_JS_URL`` twice
and the browser raised "Identifier 'THEBE_JS_URL' has already been declared". After the
build, this keeps the first of identical one-line <script> tags in each page's <head>.
"""

from __future__ import annotations

from pathlib import Path


def unique_head_scripts(html: str) -> str:
    """``html`` with repeated identical one-line <script> tags in its <head> removed."""
    head_end = html.find("</head>")
    if head_end < 0:
        return html
    seen, kept = set(), []
    for line in html[:head_end].splitlines(keepends=True):
        tag = line.strip()
        if tag.startswith("<script") and tag.endswith("</script>"):
            if tag in seen:
                continue
            seen.add(tag)
        kept.append(line)
    return "".join(kept) + html[head_end:]


def dedupe_built_pages(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        fixed = unique_head_scripts(text)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")


def setup(app):
    app.connect("build-finished", dedupe_built_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
