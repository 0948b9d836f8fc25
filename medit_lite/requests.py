"""Edit requests and loaders for the datasets the field uses.

An :class:`EditRequest` is one fact to change: a prompt template with a ``{}`` where the
subject goes ("{} is located in"), the subject ("The Eiffel Tower"), the new object
("Rome") and optionally the true one ("Paris"), with the probes that evaluation needs:
paraphrases of the prompt (generality), neighborhood prompts about other subjects with
their answers (locality), portability questions with answers, generation prompts.

Loaders read the upstream formats unchanged: CounterFact as released with ROME
(Meng et al., 2022), zsRE as repackaged by MEND (Mitchell et al., 2022) with EasyEdit's
portability field, and EasyEdit's flat JSON (Wang et al., 2023). Each takes a local path,
or a dataset id for :func:`datasets.load_dataset` when online.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple


class Probe(NamedTuple):
    """A prompt with the answer it should get."""

    prompt: str
    answer: str


def _check_text(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise TypeError(f"EditRequest.{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"EditRequest.{name} must not be empty or whitespace")


def _probes(name: str, items) -> tuple[Probe, ...]:
    out = []
    for i, item in enumerate(items or ()):
        if isinstance(item, dict):
            item = (item.get("prompt"), item.get("answer"))
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"EditRequest.{name}[{i}] must be a (prompt, answer) pair")
        _check_text(f"{name}[{i}].prompt", item[0])
        _check_text(f"{name}[{i}].answer", item[1])
        out.append(Probe(item[0], item[1]))
    return tuple(out)


def _texts(name: str, items) -> tuple[str, ...]:
    if isinstance(items, str):
        raise TypeError(f"EditRequest.{name} must be a list of strings, not one string")
    items = tuple(items or ())
    for i, text in enumerate(items):
        _check_text(f"{name}[{i}]", text)
    return items


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, validated on construction.

    ``prompt`` holds exactly one ``{}`` where ``subject`` goes. Targets are written
    without a leading space; scoring appends them after a space.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    case_id: str | int | None = None
    relation: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt)
        _check_text("subject", self.subject)
        _check_text("target_new", self.target_new)
        _check_text("target_true", self.target_true, allow_none=True)
        if self.prompt.count("{}") != 1:
            raise ValueError(
                "EditRequest.prompt must contain exactly one '{}' marking where the subject "
                f"goes, got {self.prompt!r} (use EditRequest.from_text for a full sentence)"
            )
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise ValueError("EditRequest.target_new equals target_true: nothing to edit")
        set_ = object.__setattr__
        set_(self, "paraphrases", _texts("paraphrases", self.paraphrases))
        set_(self, "generation_prompts", _texts("generation_prompts", self.generation_prompts))
        set_(self, "neighborhood", _probes("neighborhood", self.neighborhood))
        set_(self, "portability", _probes("portability", self.portability))

    @classmethod
    def from_text(cls, text: str, subject: str, target_new: str, **kwargs) -> EditRequest:
        """Build a request from a full prompt that contains the subject verbatim."""
        _check_text("prompt", text)
        _check_text("subject", subject)
        if subject not in text:
            raise ValueError(
                f"EditRequest.subject {subject!r} does not occur in the prompt {text!r}"
            )
        return cls(
            prompt=text.replace(subject, "{}", 1), subject=subject, target_new=target_new, **kwargs
        )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "relation": self.relation,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [p._asdict() for p in self.neighborhood],
            "portability": [p._asdict() for p in self.portability],
            "generation_prompts": list(self.generation_prompts),
        }


def as_requests(requests) -> list[EditRequest]:
    """Accept one request, a dict, or a list of either; always return a list."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = []
    for r in requests:
        if isinstance(r, dict):
            r = EditRequest(**r)
        if not isinstance(r, EditRequest):
            raise TypeError(f"expected EditRequest or dict, got {type(r).__name__}")
        out.append(r)
    if not out:
        raise ValueError("no edit requests given")
    return out


# -- record converters (one upstream record -> EditRequest) ------------------------------
def from_counterfact(rec: dict) -> EditRequest:
    """A CounterFact record in ROME's format (``requested_rewrite`` etc.)."""
    rw = rec["requested_rewrite"]
    true = rw["target_true"]["str"]
    return EditRequest(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=true,
        paraphrases=rec.get("paraphrase_prompts", ()),
        neighborhood=[(p, true) for p in rec.get("neighborhood_prompts", ())],
        generation_prompts=rec.get("generation_prompts", ()),
        case_id=rec.get("case_id"),
        relation=rw.get("relation_id"),
    )


def from_zsre(rec: dict) -> EditRequest:
    """A zsRE record in MEND's format (``src``, ``alt``, ``rephrase``, ``loc``...)."""
    port = rec.get("portability") or {}
    portability = [(port["New Question"], port["New Answer"])] if "New Question" in port else []
    answers = rec.get("answers") or []
    true = answers[0] if answers and answers[0].strip() != rec["alt"].strip() else None
    return EditRequest.from_text(
        rec["src"],
        rec["subject"],
        rec["alt"],
        target_true=true,
        paraphrases=[rec["rephrase"]] if rec.get("rephrase") else [],
        neighborhood=[(rec["loc"], rec["loc_ans"])] if rec.get("loc") else [],
        portability=portability,
        case_id=rec.get("case_id"),
    )


def from_easyedit(rec: dict) -> EditRequest:
    """A record in EasyEdit's flat format (``prompt``, ``target_new``, ``ground_truth``...)."""

    def listed(key):
        value = rec.get(key)
        return [value] if isinstance(value, str) else list(value or [])

    loc_prompts, loc_answers = listed("locality_prompt"), listed("locality_ground_truth")
    true = rec.get("ground_truth")
    if isinstance(true, list):
        true = true[0] if true else None
    if true is not None and true.strip() == rec["target_new"].strip():
        true = None
    return EditRequest.from_text(
        rec["prompt"],
        rec["subject"],
        rec["target_new"],
        target_true=true,
        paraphrases=listed("rephrase_prompt"),
        neighborhood=list(zip(loc_prompts, loc_answers)),
        portability=list(zip(listed("portability_prompt"), listed("portability_ground_truth"))),
        case_id=rec.get("case_id"),
    )


CONVERTERS = {"counterfact": from_counterfact, "zsre": from_zsre, "easyedit": from_easyedit}


def detect_format(rec: dict) -> str:
    """Name the upstream format of one record."""
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec and "alt" in rec:
        return "zsre"
    if "prompt" in rec and "target_new" in rec and "subject" in rec:
        return "easyedit"
    raise ValueError(f"unrecognised record format with keys {sorted(rec)}")


# -- loading -----------------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    """A local file name rather than a dataset id ("user/name")."""
    return text.endswith((".json", ".jsonl")) or text.startswith((".", "/", "~"))


def read_records(source: str | os.PathLike, split: str = "train", **dataset_kwargs) -> list[dict]:
    """Records from a local JSON file, or via :func:`datasets.load_dataset` otherwise."""
    path = Path(source)
    if path.is_file() and not dataset_kwargs:
        with path.open(encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not a JSON file: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
        return data
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"no such file: {source}")
    import datasets

    return list(datasets.load_dataset(str(source), split=split, **dataset_kwargs))


def load_requests(
    source: str | os.PathLike,
    format: str | None = None,
    limit: int | None = None,
    **dataset_kwargs,
) -> list[EditRequest]:
    """Load edit requests from a file or dataset in one of the upstream formats.

    ``format`` is ``counterfact``, ``zsre`` or ``easyedit``; by default it is detected
    from the first record. ``limit`` keeps the first N records.
    """
    records = read_records(source, **dataset_kwargs)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        records = records[:limit]
    if not records:
        raise ValueError(f"no records in {source}")
    if format is not None and format not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; known: {sorted(CONVERTERS)}")
    if not isinstance(records[0], dict):
        raise ValueError(f"{source}: record 0 is a {type(records[0]).__name__}, not an object")
    fmt = format or _detect(records[0], source)
    return [_convert(fmt, i, r, source) for i, r in enumerate(records)]


def _detect(record: dict, source) -> str:
    try:
        return detect_format(record)
    except ValueError as err:
        raise ValueError(f"{source}: record 0: {err}") from None


def _guess(record: dict) -> str | None:
    try:
        return detect_format(record)
    except ValueError:
        return None


def _convert(fmt: str, index: int, record, source) -> EditRequest:
    """One record converted, or an error naming the file, the record and the field."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object")
    try:
        return CONVERTERS[fmt](record)
    except KeyError as err:
        looks = _guess(record)
        hint = (
            f"; it looks like a {looks} record (use format={looks!r}, or leave the format out)"
            if looks not in (None, fmt)
            else ""
        )
        raise ValueError(
            f"{where} has no field {err.args[0]!r}, needed by the {fmt} format{hint}"
        ) from None
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def load_counterfact(source, limit=None, **kw) -> list[EditRequest]:
    return load_requests(source, "counterfact", limit, **kw)


def load_zsre(source, limit=None, **kw) -> list[EditRequest]:
    return load_requests(source, "zsre", limit, **kw)


def load_easyedit(source, limit=None, **kw) -> list[EditRequest]:
    return load_requests(source, "easyedit", limit, **kw)


def shared_data(name: str) -> Path | None:
    """Path of a file in the shared evaluation data folder, or None where it is absent.

    The folder is ``$MEDIT_DATA`` when set (and then only that folder: set it to an empty
    folder to see what a page does on Colab), else ``../shared/data`` beside the
    repository or beside the working directory.
    """
    if os.environ.get("MEDIT_DATA"):
        roots = [Path(os.environ["MEDIT_DATA"])]
    else:
        repo = Path(__file__).resolve().parent.parent
        roots = [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in roots:
        candidate = Path(root) / name
        if candidate.is_file():
            return candidate
    return None


def builtin_requests(relations: Iterable[str] | None = None) -> list[EditRequest]:
    """The counterfactual fact set written for this project (see data/COUNTERFACTS.md)."""
    text = resources.files("medit_lite").joinpath("data/counterfacts.json").read_text("utf-8")
    keep = set(relations) if relations is not None else None
    return [EditRequest(**r) for r in json.loads(text) if keep is None or r["relation"] in keep]
