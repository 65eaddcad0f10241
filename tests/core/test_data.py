"""Text sources and token blocks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from shrink.core.data import NOVELS, SPLITS, load_texts, token_blocks
from shrink.core.errors import ShrinkError


@pytest.fixture(scope="module")
def tok(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


def test_corpus_roles_use_different_novels():
    roles = [set(v) for v in SPLITS.values()]
    assert set().union(*roles) == set(NOVELS)
    assert sum(len(r) for r in roles) == len(NOVELS)  # no novel in two roles
    (persuasion,) = load_texts("austen:evaluation")
    assert persuasion.startswith("Persuasion") and "Sir Walter Elliot" in persuasion
    assert "\n\n" in persuasion and "who,\nfor" not in persuasion  # reflowed paragraphs
    assert len(load_texts("austen:healing")) == 3


def test_blocks_are_deterministic_and_sized(tok):
    a = token_blocks(tok, "austen:calibration", 5, 64, seed=3)
    b = token_blocks(tok, "austen:calibration", 5, 64, seed=3)
    c = token_blocks(tok, "austen:calibration", 5, 64, seed=4)
    assert a.input_ids.shape == (5, 64)
    assert (a.input_ids == b.input_ids).all() and not (a.input_ids == c.input_ids).all()
    assert a.describe()["tokens"] == 320 and a.available > 1000


def test_user_sources(tok, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("It is a truth universally acknowledged. " * 50)
    assert token_blocks(tok, str(txt), 2, 32).input_ids.shape == (2, 32)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "x.txt").write_text("one two three " * 40)
    (folder / "y.txt").write_text("four five six " * 40)
    assert len(load_texts(str(folder))) == 2
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"line {i} " * 30}) for i in range(5)))
    assert len(load_texts(str(jl))) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no"}\n')
    with pytest.raises(ShrinkError, match="line 1 has no string field 'text'"):
        load_texts(str(bad))


def test_too_little_text_says_how_many(tok, tmp_path):
    txt = tmp_path / "short.txt"
    txt.write_text("word " * 100)
    n = len(tok(txt.read_text(), add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ShrinkError, match=f"only {n // 32} blocks of 32 tokens"):
        token_blocks(tok, str(txt), 50, 32)
    with pytest.raises(ShrinkError, match="unknown corpus part"):
        load_texts("austen:nope")
    with pytest.raises(ShrinkError, match="no such text source"):
        load_texts(str(tmp_path / "missing.txt"))


def test_at_most_takes_what_the_source_holds(tok, tmp_path):
    txt = tmp_path / "short.txt"
    txt.write_text("word " * 100)
    n = (len(tok(txt.read_text(), add_special_tokens=False)["input_ids"]) + 1) // 32
    some = token_blocks(tok, str(txt), 50, 32, seed=3, at_most=True)
    assert some.available == n and some.input_ids.shape == (n, 32)
    assert torch.equal(some.input_ids, token_blocks(tok, str(txt), n, 32, seed=3).input_ids)
    few = token_blocks(tok, str(txt), 2, 32, seed=3, at_most=True)  # enough text: as asked
    assert torch.equal(few.input_ids, token_blocks(tok, str(txt), 2, 32, seed=3).input_ids)
    none = token_blocks(tok, str(txt), 5, 4096, at_most=True)
    assert none.available == 0 and none.input_ids.numel() == 0


def test_corpus_streams_are_tokenized_once_per_tokenizer(tok, embedded_dir, monkeypatch):
    """The embedded corpora are tokenized once per process and tokenizer; the memo gives the
    same ids as tokenizing again, and a different tokenizer (another EOS) is not served them."""
    from shrink.core import data

    data._STREAMS.clear()
    first = data.token_stream(tok, "tech:evaluation")
    calls = []
    real = type(tok).__call__

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", counting)
    again = data.token_stream(tok, "tech:evaluation")
    assert again == first and not calls  # served from the memo, as a fresh list
    again.append(-1)
    assert data.token_stream(tok, "tech:evaluation") == first
    other = AutoTokenizer.from_pretrained(embedded_dir)
    other.eos_token = other.bos_token or "<|im_start|>"
    assert other.eos_token_id != tok.eos_token_id
    theirs = data.token_stream(other, "tech:evaluation")
    assert calls and theirs[-1] == other.eos_token_id
    monkeypatch.undo()
    data._STREAMS.clear()
    assert data.token_stream(tok, "tech:evaluation") == first
