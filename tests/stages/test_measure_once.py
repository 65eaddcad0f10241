"""A build measures each model on each block set once: the perplexity book's ledger has no
duplicate, and evaluate reuses what heal measured of the same weights."""

from __future__ import annotations

import json

import pytest

from shrink.stages.build import build
from shrink.stages.configs import BUILD_HEAL, BuildConfig, EvaluateConfig, HealConfig, PruneConfig


def _tiny_build(tiny_model_dir) -> BuildConfig:
    """prune 2 layers, a 2-step heal and evaluate, on a 6-layer tiny llama."""
    return BuildConfig(
        model=str(tiny_model_dir("llama")),
        prune=PruneConfig(drop=2, samples=2, seq_len=32),
        heal=HealConfig(steps=2, batch_size=2, seq_len=32, rank=4),
        evaluate=EvaluateConfig(samples=1, seq_len=64),
    )


@pytest.mark.slow
def test_a_build_measures_nothing_twice(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    c = _tiny_build(tiny_model_dir)
    build(c, output=out, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    book = report["perplexity_book"]
    assert book["duplicates"] == []
    pairs = [(r["key"], r["set"]) for r in book["ledger"]]
    assert len(pairs) == len(set(pairs))
    by = [r["by"] for r in book["ledger"]]
    # heal: before and after on both domains; evaluate: only the dense source (pruned = heal's
    # "before", healed = heal's "after", the same weights on the same blocks)
    assert by.count("heal") == 4 and by.count("evaluate") == 2, book["ledger"]
    rows = report["perplexity"]
    assert rows["pruned"]["perplexity"] == report["heal"]["ppl_before"]
    assert rows["healed"]["perplexity"] == report["heal"]["ppl_after"]
    assert rows["healed"]["second"] == report["heal"]["ppl_after_second"]
    # the memory plan the build printed is in the report, beside each stage's measured peak
    plan = {r["stage"]: r for r in report["memory_plan"]}
    assert {"score", "heal", "merge", "evaluate"} <= set(plan) and plan["heal"]["fits"]
    assert plan["heal"]["mode"] == "whole (lora)" and plan["heal"]["host_bytes"] > 0
    assert all(s["peak_rss_bytes"]["main"] > 0 for s in report["stages"])


def test_build_heal_is_the_default_and_the_recipe():
    from shrink.stages.build import load_recipe

    assert BuildConfig().heal == HealConfig(**BUILD_HEAL)
    config, _ = load_recipe("smollm2-135m")
    assert config.heal == HealConfig(**BUILD_HEAL)
    assert BUILD_HEAL["steps"] == 48 and BUILD_HEAL["dropout"] == 0.0


def test_evaluate_streams_a_model_too_big_for_the_process(tiny_model_dir, monkeypatch):
    """The evaluate stage measures a folder that does not fit one layer at a time, keyed by its
    files in the book; the value equals the in-memory one."""
    import shrink.streaming.memory as memory
    from shrink.core.measures import PerplexityBook
    from shrink.stages.evaluate import evaluate

    folder = str(tiny_model_dir("llama"))
    ev = EvaluateConfig(samples=2, seq_len=32)
    whole = evaluate(folder, ev, show_progress=False, book=PerplexityBook())
    monkeypatch.setattr(memory, "too_big_to_load", lambda *a, **k: True)
    book = PerplexityBook()
    streamed = evaluate(folder, ev, show_progress=False, book=book)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-4)
    assert streamed.second.perplexity == pytest.approx(whole.second.perplexity, rel=1e-4)
    assert [r["key"][:6] for r in book.ledger] == ["files:", "files:"]
    again = evaluate(folder, ev, show_progress=False, book=book)  # from the book
    assert len(book.ledger) == 2 and again.perplexity == streamed.perplexity


def test_a_resumed_build_keeps_what_the_finished_stages_measured(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    c = _tiny_build(tiny_model_dir)
    build(c, output=out, show_progress=False, keep_stages=True)
    first = json.loads((out / "report.json").read_text())["perplexity_book"]["ledger"]
    evaluate_marker = next((out / "stages").glob("*-evaluate")) / "done.json"
    evaluate_marker.unlink()  # evaluate runs again; prune and heal are resumed
    build(c, output=out, show_progress=False, keep_stages=True, resume=True)
    report = json.loads((out / "report.json").read_text())
    assert [s["skipped"] for s in report["stages"]] == [True, True, False]
    # nothing is measured again: the ledger is the first run's, with no duplicate
    assert report["perplexity_book"]["ledger"] == first
    assert report["perplexity_book"]["duplicates"] == []
    assert report["perplexity"]["healed"]["perplexity"] == report["heal"]["ppl_after"]
