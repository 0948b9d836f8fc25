import json

import pytest

from medit_lite.requests import (
    EditRequest,
    Probe,
    as_requests,
    builtin_requests,
    detect_format,
    load_counterfact,
    load_easyedit,
    load_requests,
    load_zsre,
)
from tests.conftest import shared_or_skip


def test_valid_request_and_text():
    r = EditRequest(
        "{} is located in",
        "Angola",
        "Antarctica",
        "Africa",
        paraphrases=["Angola is part of"],
        neighborhood=[("Ghana is in", "Africa")],
    )
    assert r.text == "Angola is located in"
    assert r.neighborhood == (Probe("Ghana is in", "Africa"),)
    assert as_requests(r.to_dict() | {"neighborhood": [("Ghana is in", "Africa")]})[0] == r


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt="Angola is in"), ValueError, "exactly one '{}'"),
        (dict(prompt="{} and {} are in"), ValueError, "exactly one"),
        (dict(subject=""), ValueError, "subject must not be empty"),
        (dict(target_new="  "), ValueError, "target_new must not be empty"),
        (dict(target_new=None), TypeError, "target_new must be a string"),
        (dict(subject=42), TypeError, "subject must be a string"),
        (dict(target_true="Antarctica"), ValueError, "equals target_true"),
        (dict(paraphrases="one string"), TypeError, "list of strings"),
        (dict(paraphrases=["ok", ""]), ValueError, r"paraphrases\[1\]"),
        (dict(neighborhood=[("only a prompt",)]), TypeError, "pair"),
        (dict(neighborhood=[("p", 3)]), TypeError, "answer must be a string"),
    ],
)
def test_bad_requests_are_rejected(kwargs, error, match):
    base = dict(prompt="{} is in", subject="Angola", target_new="Antarctica", target_true="Africa")
    with pytest.raises(error, match=match):
        EditRequest(**(base | kwargs))


def test_from_text_requires_the_subject_in_the_prompt():
    r = EditRequest.from_text("What is the capital of Peru?", "Peru", "Quito")
    assert r.prompt == "What is the capital of {}?"
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        EditRequest.from_text("What is the capital of Peru?", "Chile", "Quito")


def test_counterfact_loader_on_the_real_file():
    path = shared_or_skip("counterfact_sample.json")
    reqs = load_counterfact(path)
    raw = json.loads(path.read_text())
    assert len(reqs) == len(raw) == 300
    r, rec = reqs[0], raw[0]
    assert r.text == rec["requested_rewrite"]["prompt"].format(rec["requested_rewrite"]["subject"])
    assert r.target_new == rec["requested_rewrite"]["target_new"]["str"]
    assert r.target_true == rec["requested_rewrite"]["target_true"]["str"]
    assert list(r.paraphrases) == rec["paraphrase_prompts"]
    assert [p.prompt for p in r.neighborhood] == rec["neighborhood_prompts"]
    assert all(p.answer == r.target_true for p in r.neighborhood)
    assert r.case_id == rec["case_id"] and r.relation == rec["requested_rewrite"]["relation_id"]
    assert len(load_counterfact(path, limit=7)) == 7


def test_zsre_loader_on_the_real_file():
    path = shared_or_skip("zsre_eval_sample.json")
    reqs = load_zsre(path)
    raw = json.loads(path.read_text())
    assert len(reqs) == len(raw)
    r, rec = reqs[0], raw[0]
    assert r.text == rec["src"] and r.target_new == rec["alt"]
    assert r.paraphrases == (rec["rephrase"],)
    assert r.neighborhood == (Probe(rec["loc"], rec["loc_ans"]),)
    assert r.portability[0].answer == rec["portability"]["New Answer"]


def test_easyedit_loader_on_the_real_file():
    path = shared_or_skip("counterfact_easyedit_sample.json")
    reqs = load_easyedit(path, limit=50)
    raw = json.loads(path.read_text())[:50]
    for r, rec in zip(reqs, raw):
        assert r.text == rec["prompt"] and r.subject == rec["subject"]
        assert r.target_true == rec["ground_truth"]
        assert r.neighborhood[0] == Probe(rec["locality_prompt"], rec["locality_ground_truth"])


def test_format_detection_and_the_datasets_path():
    path = shared_or_skip("counterfact_sample.json")
    via_json = load_requests(path, limit=5)
    # the same file through `datasets` (the code path used for hub ids when online)
    via_datasets = load_requests("json", "counterfact", limit=5, data_files=str(path))
    assert [r.text for r in via_datasets] == [r.text for r in via_json]
    assert detect_format({"src": "q", "alt": "a"}) == "zsre"
    with pytest.raises(ValueError, match="unrecognised record format"):
        detect_format({"question": "?"})
    with pytest.raises(ValueError, match="unknown format"):
        load_requests(path, "mquake")


def test_builtin_fact_set_shape(facts):
    assert len(facts) >= 60
    relations = {r.relation for r in facts}
    assert len(relations) >= 8
    for r in facts:
        assert r.target_true and len(r.paraphrases) >= 2 and len(r.neighborhood) >= 5
        assert all(r.subject not in p.prompt for p in r.neighborhood)
    assert len({r.case_id for r in facts}) == len(facts)
    assert builtin_requests(["capital_of"]) and all(
        r.relation == "capital_of" for r in builtin_requests(["capital_of"])
    )


def test_builtin_facts_are_known_to_the_default_model(lm, facts):
    """The model ranks target_true first on every built-in fact's main prompt."""
    from medit_lite.metrics import score_targets

    scores = score_targets(lm, [r.text for r in facts], [r.target_true for r in facts])
    wrong = [r.text for r, s in zip(facts, scores) if s.predicted[0] != s.target_ids[0]]
    assert not wrong, f"the default model does not answer: {wrong}"


def _write(tmp_path, payload, name="data.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


COUNTERFACT_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "subject": "Angola",
        "target_new": {"str": "Antarctica"},
        "target_true": {"str": "Africa"},
    },
}


def test_loader_errors_name_the_file_the_record_and_the_field(tmp_path):
    good = dict(COUNTERFACT_RECORD)
    no_true = json.loads(json.dumps(COUNTERFACT_RECORD))
    del no_true["requested_rewrite"]["target_true"]
    path = _write(tmp_path, [good, no_true])
    with pytest.raises(ValueError, match=r"data.json: record 1 has no field 'target_true'"):
        load_requests(path)
    # a CounterFact file read as zsRE says which format it looks like
    with pytest.raises(ValueError, match=r"record 0 has no field 'src'.*looks like a counterfact"):
        load_zsre(_write(tmp_path, [good]))
    zsre = {"src": "Where is Angola?", "subject": "Ghana", "alt": "Asia", "answers": ["Africa"]}
    with pytest.raises(ValueError, match=r"record 0: .*subject 'Ghana' does not occur"):
        load_zsre(_write(tmp_path, [zsre]))
    with pytest.raises(ValueError, match=r"record 0: .*target_new must not be empty"):
        load_zsre(_write(tmp_path, [zsre | {"subject": "Angola", "alt": " "}]))
    with pytest.raises(ValueError, match="unknown format 'rome'"):
        load_requests(path, format="rome")


def test_loader_rejects_files_that_hold_no_records(tmp_path):
    with pytest.raises(ValueError, match="is not a JSON file"):
        load_requests(_write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="no records"):
        load_requests(_write(tmp_path, []))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_requests(_write(tmp_path, '"a string"'))
    with pytest.raises(ValueError, match="record 0 is a str, not an object"):
        load_requests(_write(tmp_path, ["a string"]))
    with pytest.raises(ValueError, match="unrecognised record format"):
        load_requests(_write(tmp_path, [{"question": "?"}]))
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.json"):
        load_requests(tmp_path / "missing.json")


def test_medit_data_is_the_only_data_folder_when_set(tmp_path, monkeypatch):
    from medit_lite import shared_data

    monkeypatch.setenv("MEDIT_DATA", str(tmp_path))
    assert shared_data("counterfact_sample.json") is None  # the repository's copy is hidden
    (tmp_path / "counterfact_sample.json").write_text("[]")
    assert shared_data("counterfact_sample.json") == tmp_path / "counterfact_sample.json"


def test_quick_sizes_follow_the_environment(monkeypatch):
    from medit_lite.quick import sized

    monkeypatch.delenv("MEDIT_QUICK", raising=False)
    assert sized(10, 2) == 10
    monkeypatch.setenv("MEDIT_QUICK", "1")
    assert sized(10, 2) == 2
    with pytest.raises(ValueError, match="must not exceed"):
        sized(2, 10)
