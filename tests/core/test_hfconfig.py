"""Reading an HF folder's config.json and its quantization method."""

from __future__ import annotations

import json

import pytest

from shrink.core.errors import ShrinkError
from shrink.core.hfconfig import quant_method, read_config


def test_read_config_and_quant_method(tmp_path):
    assert read_config(tmp_path) is None and quant_method(tmp_path) == ""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_config(tmp_path) == {"model_type": "llama"}
    assert quant_method(tmp_path) == ""
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "GPTQ", "bits": 4}})
    )
    assert quant_method(tmp_path) == "gptq"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_an_unreadable_config_is_one_line(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ShrinkError, match="cannot read .*config.json"):
        quant_method(tmp_path)


def test_the_runtime_kinds_share_it():
    from shrink.runtime.kinds import hf

    assert hf.quant_method is quant_method and hf.read_config is read_config
