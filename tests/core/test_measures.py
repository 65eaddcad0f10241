"""Measure once (shrink.core.measures): weight keys, the perplexity book and its ledger."""

from __future__ import annotations

import pytest
import torch

from shrink.core.errors import ShrinkError
from shrink.core.measures import PerplexityBook, measure, set_name, weights_key
from shrink.core.perplexity import perplexity


def _tiny(seed=0):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", 2), dtype=torch.float32).eval()


def _ids(seed=1):
    return torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_weights_key_follows_every_weight_and_its_dtype():
    a, b = _tiny(0), _tiny(0)
    assert weights_key(a) == weights_key(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert weights_key(a) != weights_key(b)
    assert weights_key(a) != weights_key(_tiny(0).to(torch.bfloat16))


def test_weights_key_of_a_folder(tmp_path):
    model = _tiny(0)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert weights_key(tmp_path / "a") == weights_key(tmp_path / "b")
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path / "b")
    assert weights_key(tmp_path / "a") != weights_key(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShrinkError, match="no weight files"):
        weights_key(tmp_path / "empty")


def test_measure_computes_once_per_weights_and_set():
    book = PerplexityBook()
    model, ids = _tiny(0), _ids()
    name = set_name("x", 4, 16, 0)
    first = measure(book, model, ids, name, by="heal", what="before", show_progress=False)
    again = measure(book, _tiny(0), ids, name, by="evaluate", what="pruned", show_progress=False)
    assert again.perplexity == first.perplexity
    assert len(book.ledger) == 1 and book.ledger[0]["by"] == "heal"
    # the same weights on another set, another model on the same set: both computed
    measure(
        book, model, _ids(2), set_name("x", 4, 16, 1), by="heal", what="before", show_progress=False
    )
    other = measure(book, _tiny(1), ids, name, by="heal", what="after", show_progress=False)
    assert other.perplexity != first.perplexity
    assert len(book.ledger) == 3 and book.duplicates() == []
    assert first.perplexity == perplexity(model, ids, show_progress=False).perplexity
    # what a caller does to the result it got does not change the book
    again.second = first
    assert book.get(book.ledger[0]["key"], name).second is None


def test_duplicates_are_reported():
    book = PerplexityBook()
    model, ids = _tiny(0), _ids()
    res = perplexity(model, ids, show_progress=False)
    book.put("k", "s", res, by="a", what="x")
    book.put("k", "s", res, by="b", what="x")
    assert book.duplicates() == [("k", "s")]
    assert book.to_dict()["duplicates"] == [["k", "s"]]


def test_without_a_book_it_just_measures():
    model, ids = _tiny(0), _ids()
    assert (
        measure(None, model, ids, "s", by="a", what="b", show_progress=False).perplexity
        == perplexity(model, ids, show_progress=False).perplexity
    )
