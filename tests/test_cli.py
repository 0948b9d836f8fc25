import json
import subprocess
import sys

import pytest

from medit_lite.metrics import METRIC_KEYS
from tests.conftest import shared_or_skip


def run_cli(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "medit_lite", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "CI": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_edit_prints_before_and_after():
    out = run_cli(
        "edit",
        "--method",
        "ft-l",
        "--prompt",
        "{} is located in the city of",
        "--subject",
        "The Eiffel Tower",
        "--target",
        "Rome",
        "--max-new-tokens",
        "4",
    )
    before = out.split("before:")[1].split("\n")[0]
    after = out.split("after:")[1].split("\n")[0]
    assert "Paris" in before and "Rome" in after
    assert "model.layers." in out


def test_cli_eval_counterfact_json(tmp_path):
    path = shared_or_skip("counterfact_sample.json")
    out_file = tmp_path / "out.json"
    out = run_cli(
        "eval",
        "--method",
        "ft-l",
        "--data",
        str(path),
        "--limit",
        "3",
        "--ge-tokens",
        "10",
        "--json",
        str(out_file),
    )
    assert "ft-l" in out and "ES" in out
    result = json.loads(out_file.read_text())
    assert result["method"] == "ft-l" and result["n"] == 3
    assert set(result["metrics"]) == set(METRIC_KEYS) - {"portability"}
    assert result["seconds_per_edit"] > 0


def test_cli_eval_none_on_zsre_has_portability(tmp_path):
    path = shared_or_skip("zsre_eval_sample.json")
    out_file = tmp_path / "zsre.json"
    run_cli(
        "eval",
        "--method",
        "none",
        "--data",
        str(path),
        "--format",
        "zsre",
        "--limit",
        "4",
        "--json",
        str(out_file),
    )
    metrics = json.loads(out_file.read_text())["metrics"]
    assert {"portability", "reliability", "generalization", "locality"} <= set(metrics)
    assert metrics["locality"] == 1.0  # unedited: identical to itself
    assert "GE" not in metrics


def test_cli_sequential_on_builtin_facts(tmp_path):
    out_file = tmp_path / "seq.json"
    run_cli("eval", "--method", "ft", "--limit", "3", "--sequential", "--json", str(out_file))
    result = json.loads(out_file.read_text())
    assert result["sequential"] is True and result["n"] == 3
    assert result["metrics"]["ES"] >= 2 / 3


def test_cli_rejects_bad_hparam():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medit_lite",
            "edit",
            "--prompt",
            "{} is in",
            "--subject",
            "X",
            "--target",
            "Y",
            "--hparam",
            "lr=nan",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "lr must be finite" in proc.stderr


@pytest.mark.parametrize("command", [["methods"], ["--help"]])
def test_cli_lists(command):
    out = run_cli(*command)
    assert "ft-l" in out or "edit" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", "--prompt", "X is in", "--subject", "X", "--target", "Y"], "exactly one '{}'"),
        (["edit", "--prompt", "{} is in", "--subject", "X", "--target", " "], "target_new"),
        (
            ["edit", "--method", "nope", "--prompt", "{} is in", "--subject", "X", "--target", "Y"],
            "unknown method 'nope'",
        ),  # fmt: skip
        (["eval", "--data", "/nonexistent/cf.json"], "no such file: /nonexistent/cf.json"),
        (["eval", "--hparam", "lr"], "--hparam expects NAME=VALUE"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_status_2(args, message, capsys):
    from medit_lite.cli import run

    assert run(args) == 2
    err = capsys.readouterr().err  # (after the weights' loading bar, where a model loads)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_cli_format_mismatch_names_the_record_and_the_format(tmp_path, capsys):
    from medit_lite.cli import run

    path = shared_or_skip("counterfact_sample.json")
    assert run(["eval", "--data", str(path), "--format", "zsre", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "record 0 has no field 'src'" in err and "looks like a counterfact record" in err
    with pytest.raises(ValueError, match="record 0"):  # --debug shows the real exception
        run(["--debug", "eval", "--data", str(path), "--format", "zsre", "--limit", "2"])
