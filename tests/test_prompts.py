"""Prompt sets: the public sets beside a checkout, or the starter set shipped inside the package."""

from __future__ import annotations

import pytest

from exitspec import prompts
from exitspec.calibration.sequences import heldout_prompts
from exitspec.training.data import read_source


@pytest.fixture
def no_shared_data(monkeypatch):
    """An installed exitspec: no ../shared/data beside it."""
    monkeypatch.setattr(prompts, "shared_data_dir", lambda: None)


def test_the_starter_set_stands_in_where_no_data_folder_is(no_shared_data):
    sets = prompts.prompt_sets("train")
    assert [s[0].category for s in sets] == ["chat", "code", "math", "roleplay"]
    assert all(len(s) == 40 for s in sets)  # 50 each, the first 80% for training
    mixed = prompts.mixed_prompts("train", per_set=3)
    assert [p.category for p in mixed] == ["chat", "code", "math", "roleplay"] * 3
    # training's default data and calibration / evaluation's held-out parts read it too, apart
    assert read_source("mixed", per_set=5)[0] == prompts.mixed_prompts("train", 5)
    cal, ev = heldout_prompts("calibrate", 100), heldout_prompts("eval", 100)
    assert len(cal) == len(ev) == 20 and not {p.text for p in cal} & {p.text for p in ev}
    train_texts = {p.text for s in sets for p in s}
    assert not train_texts & {p.text for p in cal + ev}


def test_a_named_data_folder_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.mixed_prompts("train", 3, data_dir=tmp_path / "nowhere")
