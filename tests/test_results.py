"""The benchmark results as pages read them (medit_lite.results), and that they ship as
package data (what a page opened on Colab reads after ``pip install``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medit_lite import results

REPO = Path(__file__).resolve().parent.parent


def _result(method, n, sequential=False, **metrics):
    return {"method": method, "n": n, "sequential": sequential, "metrics": metrics}


@pytest.fixture
def results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_RESULTS", str(tmp_path))
    payload = {
        "unedited": {"counterfact": _result("none", 10, ES=0.1, NS=0.7)},
        "methods": {
            "rome": {
                "counterfact": _result("rome", 10, ES=1.0, NS=0.65),
                "zsre": _result("rome", 5, reliability=0.9, locality=0.95),
            },
            "batch_of_ten": {"counterfact": _result("memit", 10, ES=0.8, NS=0.69)},
        },
        "stream": {"zsre": _result("grace", 20, sequential=True, reliability=1.0)},
    }
    (tmp_path / "demo.json").write_text(json.dumps(payload))
    (tmp_path / "small.json").write_text(
        json.dumps({"counterfact": _result("rome", 3, ES=0.0, NS=0.0)})
    )
    return tmp_path


def test_results_are_package_data_and_benchmarks_link_there(monkeypatch):
    monkeypatch.delenv("MEDIT_RESULTS", raising=False)
    folder = results.results_dir()
    assert folder == Path(results.__file__).resolve().parent / "data" / "results"
    assert (REPO / "benchmarks" / "results").resolve() == folder.resolve()
    assert any(folder.glob("*.json")), "no benchmark results in the package"


def test_a_built_wheel_carries_every_results_file(tmp_path):
    """What `pip install` on Colab gets: every JSON the pages read is inside the wheel
    (built from a copy of the sources, so that no build folder lands in the repository)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "medit_lite", src / "medit_lite",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("medit_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("medit_lite/data/results/")}
    expected = {p.name for p in (REPO / "medit_lite" / "data" / "results").glob("*.json")}
    assert expected and expected <= shipped, sorted(expected - shipped)
    assert "medit_lite/data/counterfacts.json" in names


def test_load_results_reads_a_file_or_says_none(results_folder):
    assert results.load_results("demo")["methods"]["rome"]["zsre"]["n"] == 5
    assert results.load_results("not-run") is None


def test_evaluation_rows_find_every_result_with_its_dataset_and_mode(results_folder):
    rows = results.evaluation_rows()
    found = {(r["file"], r["method"], r["data"], r["sequential"], r["n"]) for r in rows}
    assert found == {
        ("demo", "none", "counterfact", False, 10),
        ("demo", "rome", "counterfact", False, 10),
        ("demo", "rome", "zsre", False, 5),
        ("demo", "memit", "counterfact", False, 10),
        ("demo", "grace", "zsre", True, 20),
        ("small", "rome", "counterfact", False, 3),
    }
    labels = {r["label"] for r in rows if r["method"] == "memit"}
    assert labels == {"memit (one batch)"}
    assert {r["file"] for r in results.evaluation_rows(["small"])} == {"small"}


def test_comparison_keeps_the_run_with_most_records_unedited_first(results_folder):
    rows = results.evaluation_rows()
    table = results.comparison(rows, "counterfact", ["ES", "NS"])
    assert [r["label"] for r in table] == ["none", "memit (one batch)", "rome"]
    rome = table[-1]
    assert rome["n"] == 10 and rome["ES"] == 1.0 and rome["file"] == "demo"
    assert [
        r["label"] for r in results.comparison(rows, "zsre", ["reliability"], sequential=True)
    ] == ["grace"]
    html = results.comparison_frame(rows, "counterfact", ["ES", "NS"]).to_html()
    assert "unedited NS" in html and "0.650" in html and "0.700" in html


def test_evaluate_tables_show_every_metric_present():
    from medit_lite.evaluate import format_table, results_frame

    runs = [
        {"method": "none", "n": 3, "metrics": {"ES": 0.25, "portability": 0.5},
         "seconds_per_edit": 0.0},
        {"method": "ft-l", "n": 3, "metrics": {"ES": 1.0}, "seconds_per_edit": 1.5},
    ]  # fmt: skip
    text = format_table(runs)
    assert text.splitlines()[0].split() == ["method", "n", "ES", "portability", "s/edit"]
    assert "1.000" in text and "-" in text.splitlines()[2]
    html = results_frame(runs).to_html()
    assert "portability" in html and "0.500" in html and "–" in html and "1.500" in html
    assert "portability" not in results_frame(runs, ["ES"]).to_html()
