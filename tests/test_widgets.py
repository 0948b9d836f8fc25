"""The editing playground, driven headless through its buttons on the real default model."""

from __future__ import annotations

import pytest

from medit_lite import weights_fingerprint
from medit_lite.widgets import CUSTOM, playground


@pytest.fixture
def pg(lm, unchanged):
    panel = playground(lm, method="ft-l")
    yield panel
    panel.restore()


def test_controls_start_on_a_fact_and_a_method_with_their_defaults(lm, pg):
    from medit_lite.methods.ft import FTLHParams

    assert pg.edit_button.description == "Edit" and pg.restore_button.description == "Restore"
    assert pg.request().subject == "Eiffel Tower"
    assert pg.method.value == "ft-l" and "rome" in pg.method.options
    assert pg.hparam_boxes["lr"].value == FTLHParams.for_model(lm).lr
    assert pg.overrides() == {}
    pg.method.value = "tpatcher"  # switching the method rebuilds the number boxes
    assert "memory_weight" in pg.hparam_boxes and "lr" in pg.hparam_boxes
    assert playground(lm).method.value == "rome"  # the page's preselected method


def test_edit_and_restore_buttons(lm, pg, fingerprint):
    pg.hparam_boxes["steps"].value = 12  # fewer steps than the default, to keep it quick
    assert pg.overrides() == {"steps": 12}
    pg.edit_button.click()
    assert pg.result is not None and pg.result.hparams.steps == 12
    assert weights_fingerprint(lm) != fingerprint and pg.result.changed
    assert not pg.restore_button.disabled
    before, after = pg.last["before"]["probs"], pg.last["after"]["probs"]
    assert after["new"][0] > before["new"][0]  # the edit raised P(Rome) on the edit prompt
    assert "<table>" in pg.completions_html() and "Eiffel Tower" in pg.completions_html()
    assert "edited with" in pg.status.value
    assert len(pg.figure().axes) == 2
    pg.restore_button.click()
    assert weights_fingerprint(lm) == fingerprint and pg.restore_button.disabled
    assert "restored" in pg.status.value


def test_bad_input_is_shown_and_leaves_the_model_untouched(lm, pg, fingerprint):
    pg.fact.value = -1
    assert pg.fact.label == CUSTOM and pg.custom.layout.display == ""
    pg.prompt.value, pg.subject.value, pg.target_new.value = "{} is in", "Big Ben", "   "
    pg.edit_button.click()
    assert pg.result is None and "not edited" in pg.status.value
    assert "target_new" in pg.status.value
    pg.target_new.value = "Rome"
    pg.hparam_boxes["lr"].value = -1.0
    pg.edit_button.click()
    assert pg.result is None and "lr" in pg.status.value
    assert weights_fingerprint(lm) == fingerprint
