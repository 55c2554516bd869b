"""A truncated or malformed ``mmart_chooser.json`` is one clear error naming the file (issue 12, item 13)."""

from __future__ import annotations

import json

import pytest

from mmart.errors import UserError
from mmart.model.checkpoint import CHOOSER_FILE, read_spec


@pytest.mark.parametrize("text", [
    '{"format_version": 1, "base_model": "default", "proj',  # cut off mid-save
    "[]",
    json.dumps({"format_version": 1, "base_model": "default"}),  # no projector
    json.dumps({"format_version": 1, "base_model": "default", "projector": {"no_such_field": 1}}),
])
def test_damaged_spec_is_one_line_naming_the_file(tmp_path, text):
    (tmp_path / CHOOSER_FILE).write_text(text)
    with pytest.raises(UserError) as e:
        read_spec(tmp_path)
    assert str(tmp_path / CHOOSER_FILE) in str(e.value) and "\n" not in str(e.value)
