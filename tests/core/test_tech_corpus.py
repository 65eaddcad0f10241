"""The second held-out domain (tech:evaluation / tech:calibration, CPython's reference docs)."""

from __future__ import annotations

import pytest

from shrink.core.data import load_texts, token_blocks
from shrink.core.errors import ShrinkError


def test_halves_are_disjoint_prose():
    ev, cal = load_texts("tech:evaluation"), load_texts("tech:calibration")
    assert len(ev) >= 30 and len(cal) >= 20
    paras = [{p for d in docs for p in d.split("\n\n")} for docs in (ev, cal)]
    assert not paras[0] & paras[1]  # no paragraph of the held-out half is in the other
    text = "\n".join(ev)
    assert 150_000 < len(text) < 250_000
    assert "::=" not in text and ">>>" not in text
    assert "built-in" in text  # hyphenated words re-joined across line wraps


def test_fixed_blocks(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    a = token_blocks(tok, "tech:evaluation", 8, 512, seed=0)
    b = token_blocks(tok, "tech:evaluation", 8, 512, seed=0)
    assert a.input_ids.equal(b.input_ids) and a.available >= 60


def test_unknown_part():
    with pytest.raises(ShrinkError, match="tech:evaluation"):
        load_texts("tech:healing")
