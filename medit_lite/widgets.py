"""The editing playground: pick a fact and a method, click **Edit**, see what changed.

``playground(lm)`` returns a :class:`Playground`, an ipywidgets panel with

* a fact picker (the built-in facts, or "type your own" with prompt, subject and targets);
* a method picker (every registered method) and number fields for the chosen method's
  scalar hyperparameters, filled with its defaults for this model;
* an **Edit** and a **Restore** button. Edit first restores any earlier edit of the
  playground (one edit at a time), then runs :func:`medit_lite.edit` inside the click
  handler; Restore puts back the bit-identical weights.

After an edit the panel shows greedy completions before and after for the prompt, its
paraphrases and its neighbors, a bar chart of P(new target) and P(true target) before and
after, the seconds the edit took and the parameters it changed. Bad input (a subject that
is not in the prompt, an empty target, a hyperparameter out of range) is shown in the
panel; ``edit()`` validates before any weight changes, so the model stays as it was.

The same actions are plain methods (``edit()``, ``restore()``), so a page can run one edit
without a browser, and tests drive the buttons with ``button.click()``.
"""

from __future__ import annotations

import dataclasses
import html
import re

import ipywidgets as w

from .editing import EditResult, edit, get_method
from .metrics import score_targets
from .models import LM
from .requests import EditRequest, builtin_requests

CUSTOM = "(type your own fact)"
DEFAULT_METHOD = "rome"
DEFAULT_FACT = "Eiffel Tower"


def _label(r: EditRequest) -> str:
    return f"{r.text} … {r.target_true or '?'} → {r.target_new}"


def _scalar_fields(hp) -> list[dataclasses.Field]:
    """The hyperparameters a number box can edit (ints and floats, not flags or tuples)."""
    out = []
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(f)
    return out


class Playground:
    """The widget panel and its state; display it in a notebook (it is the ``box``)."""

    def __init__(self, lm: LM, facts: list[EditRequest] | None = None, method: str | None = None):
        from . import methods  # noqa: F401  (registers the built-in methods)
        from .editing import METHODS

        self.lm = lm
        self.facts = list(facts) if facts is not None else builtin_requests()
        self.result: EditResult | None = None
        self.last: dict | None = None
        self.message = ""  # the status line as plain text
        labels = [(_label(r), i) for i, r in enumerate(self.facts)] + [(CUSTOM, -1)]
        default = next((i for i, r in enumerate(self.facts) if r.subject == DEFAULT_FACT), 0)
        self.fact = w.Dropdown(options=labels, value=default if self.facts else -1,
                               description="fact", layout=w.Layout(width="95%"))  # fmt: skip
        self.prompt = w.Text(description="prompt", placeholder="{} is located in the city of")
        self.subject = w.Text(description="subject", placeholder="The Eiffel Tower")
        self.target_new = w.Text(description="new target", placeholder="Rome")
        self.target_true = w.Text(description="true target", placeholder="Paris (optional)")
        self.custom = w.VBox([self.prompt, self.subject, self.target_new, self.target_true])
        names = sorted(METHODS)
        chosen = method or (DEFAULT_METHOD if DEFAULT_METHOD in names else names[0])
        self.method = w.Dropdown(options=names, value=chosen, description="method")
        self.hparams = w.VBox()
        self.edit_button = w.Button(description="Edit", button_style="primary", icon="pencil")
        self.restore_button = w.Button(description="Restore", icon="undo", disabled=True)
        self.status = w.HTML()
        self.output = w.Output()
        self.fact.observe(lambda change: self._show_custom(), names="value")
        self.method.observe(lambda change: self._build_hparams(), names="value")
        self.edit_button.on_click(lambda button: self.edit())
        self.restore_button.on_click(lambda button: self.restore())
        self._show_custom()
        self._build_hparams()
        self.box = w.VBox(
            [
                self.fact,
                self.custom,
                w.HBox([self.method, self.edit_button, self.restore_button]),
                self.hparams,
                self.status,
                self.output,
            ]
        )

    # -- controls --------------------------------------------------------------------
    def _show_custom(self) -> None:
        self.custom.layout.display = "" if self.fact.value == -1 else "none"

    def _build_hparams(self) -> None:
        spec = get_method(self.method.value)
        hp = spec.hparams.for_model(self.lm)
        boxes = []
        for f in _scalar_fields(hp):
            value = getattr(hp, f.name)
            cls = w.IntText if isinstance(value, int) else w.FloatText
            boxes.append(cls(value=value, description=f.name, style={"description_width": "40%"}))
        self.hparam_boxes = {b.description: b for b in boxes}
        self.hparams.children = [w.HBox(boxes[i : i + 3]) for i in range(0, len(boxes), 3)]

    def request(self) -> EditRequest:
        """The request the controls describe (raises ValueError/TypeError on bad input)."""
        if self.fact.value != -1:
            return self.facts[self.fact.value]
        return EditRequest(
            prompt=self.prompt.value,
            subject=self.subject.value,
            target_new=self.target_new.value,
            target_true=self.target_true.value or None,
        )

    def overrides(self) -> dict:
        """Hyperparameters whose box differs from the method's default for this model."""
        hp = get_method(self.method.value).hparams.for_model(self.lm)
        return {
            name: box.value
            for name, box in self.hparam_boxes.items()
            if box.value != getattr(hp, name)
        }

    # -- actions ---------------------------------------------------------------------
    def edit(self) -> EditResult | None:
        """Restore any earlier edit, then edit with the chosen fact, method and numbers."""
        self.restore()
        try:
            request = self.request()
            overrides = self.overrides()
            probes = self._probes(request)
            before = self._measure(request, probes)
            self._set_status(f"editing with {self.method.value} …")
            self.result = edit(self.lm, request, self.method.value, **overrides)
        except (ValueError, TypeError, FloatingPointError) as err:
            self._set_status(f"<b>not edited</b>: {html.escape(str(err))}", error=True)
            return None
        after = self._measure(request, probes)
        self.last = {"request": request, "probes": probes, "before": before, "after": after}
        self.restore_button.disabled = False
        changed = ", ".join(self.result.changed) or "no original weight (modules added)"
        self._set_status(
            f"edited with <b>{self.result.method}</b> in {self.result.seconds:.2f} s; "
            f"changed: {html.escape(changed)}"
        )
        self._render()
        return self.result

    def restore(self) -> None:
        """Undo the playground's edit: bit-identical weights, added modules removed."""
        if self.result is not None and not self.result.restored:
            self.result.restore()
            self._set_status("restored: the model is as it was before the edit")
        self.restore_button.disabled = True

    # -- measuring and showing -------------------------------------------------------
    @staticmethod
    def _probes(r: EditRequest) -> list[tuple[str, str]]:
        rows = [("edit prompt", r.text)]
        rows += [(f"paraphrase {i + 1}", p) for i, p in enumerate(r.paraphrases)]
        rows += [(f"neighbor {i + 1}", p.prompt) for i, p in enumerate(r.neighborhood)]
        return rows

    def _measure(self, r: EditRequest, probes) -> dict:
        prompts = [p for _, p in probes]
        targets = {"new": r.target_new} | ({"true": r.target_true} if r.target_true else {})
        probs = {
            key: [s.prob for s in score_targets(self.lm, prompts, [t] * len(prompts))]
            for key, t in targets.items()
        }
        return {"completions": self.lm.generate(prompts, max_new_tokens=8), "probs": probs}

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        self.status.value = f'<span style="color:{color}">{text}</span>'
        self.message = html.unescape(re.sub(r"<[^>]+>", "", text))

    def completions_html(self) -> str:
        """The before/after completions of the last edit as an HTML table."""
        if self.last is None:
            return ""
        cells = "".join(
            f"<tr><td>{html.escape(kind)}</td><td>{html.escape(prompt)}</td>"
            f"<td>{html.escape(b)}</td><td>{html.escape(a)}</td></tr>"
            for (kind, prompt), b, a in zip(
                self.last["probes"],
                self.last["before"]["completions"],
                self.last["after"]["completions"],
            )
        )
        head = "<tr><th></th><th>prompt</th><th>before</th><th>after</th></tr>"
        return f"<table>{head}{cells}</table>"

    def figure(self):
        """Bars of P(new) and P(true) before and after the last edit."""
        from .plots import probability_bars

        r = self.last["request"]
        name = {"new": f"P({r.target_new})", "true": f"P({r.target_true})"}
        before = {name[k]: v for k, v in self.last["before"]["probs"].items()}
        after = {name[k]: v for k, v in self.last["after"]["probs"].items()}
        labels = [kind for kind, _ in self.last["probes"]]
        return probability_bars(labels, before, after, title=f"{self.result.method}: {r.subject}")

    def _render(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import HTML, display

        self.output.clear_output()
        with self.output:
            display(HTML(self.completions_html()))
            fig = self.figure()
            display(fig)
            plt.close(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)


def playground(lm: LM, facts: list[EditRequest] | None = None, method: str | None = None):
    """The editing playground for ``lm`` (see the module docstring)."""
    return Playground(lm, facts, method)
