"""The automatic strategy (shrink.stages.auto) and the quality guard (shrink.core.guard)."""

from __future__ import annotations

import math

import pytest
import torch

from shrink.core.errors import ShrinkError
from shrink.core.guard import guard_blocks, quality_ratio
from shrink.core.layers import without_layers
from shrink.core.perplexity import perplexity
from shrink.core.scores import LayerScores
from shrink.stages.auto import choose_auto, heldout_blocks
from shrink.stages.strategies import choose_layers


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()


def _scores(L=6):
    # BI picks layers 1, 4; relmag picks 2, 3; angular picks the block of 2 starting at 3
    bi = [0.9, 0.1, 0.8, 0.7, 0.2, 0.95]
    relmag = [0.9, 0.8, 0.1, 0.2, 0.7, 0.95]
    angular = [[0.5] * (L - n + 1) for n in range(1, L + 1)]
    angular[1][3] = 0.01
    return LayerScores("tiny", L, bi, relmag, angular, tokens=1, samples=1)


def _propose(model, scores):
    """The registry's choice for each candidate, as the prune stage passes it."""
    L = scores.num_layers
    return lambda name: choose_layers(name, 2, L, scores)


def _ids(samples, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (samples, 32), generator=g)


@pytest.mark.parametrize("bridge", [False, True])
def test_auto_picks_the_lowest_measured_perplexity(tiny_model_dir, bridge):
    model = _model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held, calib = _ids(4, 5), _ids(8, 6)
    result = choose_auto(
        model,
        2,
        held,
        _propose(model, _scores()),
        candidates=("bi", "angular", "relmag"),
        bridge=bridge,
        calib_input_ids=calib,
    )
    assert [c.layers for c in result.candidates] == [[1, 4], [3, 4], [2, 3]]
    best = min(result.candidates, key=lambda c: c.perplexity)
    assert (result.layers, result.perplexity) == (best.layers, best.perplexity)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if not bridge:  # each number is what the pruned model measures, independently
        for c in result.candidates:
            with without_layers(model, c.layers):
                ppl = perplexity(model, held, show_progress=False).perplexity
            assert math.isclose(ppl, c.perplexity, rel_tol=1e-6)
    else:
        assert all(c.bridge and c.bridge[0]["folded_into"] is not None for c in result.candidates)


def test_auto_merges_identical_sets_and_skips_iterative_without_calibration(tiny_model_dir):
    scores = _scores()
    scores.relmag = scores.bi
    model = _model(tiny_model_dir)
    result = choose_auto(
        model, 2, _ids(2, 5), _propose(model, scores), candidates=("bi", "relmag", "iterative")
    )
    assert result.candidates[0].strategy == "bi=relmag"
    assert result.candidates[-1].strategy == "iterative"
    assert result.candidates[-1].note.startswith("skipped")
    with pytest.raises(ShrinkError, match="calibration"):
        choose_auto(model, 2, _ids(2, 5), _propose(model, scores), bridge=True)


def test_heldout_blocks_share_no_token_with_calibration(embedded_dir):
    from transformers import AutoTokenizer

    from shrink.core.data import token_blocks

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cal = token_blocks(tok, "austen:calibration", 32, 256, 0)
    held = heldout_blocks(tok, 8, 256)
    assert held.input_ids.shape == (8, 256)
    cal_windows = {tuple(r[i : i + 16].tolist()) for r in cal.input_ids for i in range(0, 240, 16)}
    assert not any(
        tuple(r[i : i + 16].tolist()) in cal_windows for r in held.input_ids for i in range(240)
    )


def test_guard_ok_on_the_source_itself(tiny_model_dir):
    model = _model(tiny_model_dir)
    v = quality_ratio(model, model, _ids(2, 1))
    assert v.ok and v.verdict == "ok" and math.isclose(v.ratio, 1.0)
    with pytest.raises(ShrinkError):
        quality_ratio(model, 10.0, _ids(2, 1), threshold=1.0)


@pytest.mark.slow
def test_guard_fires_on_strategy_last_of_the_embedded_model():
    from shrink.core.models import load_model
    from shrink.stages.strategies import choose_layers

    loaded = load_model("smollm2-135m")
    blocks = guard_blocks(loaded.tokenizer)
    source = perplexity(loaded.model, blocks.input_ids, show_progress=False).perplexity
    layers, _ = choose_layers("last", 6, 30)
    with without_layers(loaded.model, layers):
        v = quality_ratio(loaded.model, source, blocks.input_ids, blocks=blocks.describe())
    assert not v.ok and v.verdict == "degraded" and v.ratio > 100
    assert "QUALITY GUARD" in v.message
    with without_layers(loaded.model, [15, 16, 17]):  # a mild removal (angular's block) passes
        assert quality_ratio(loaded.model, source, blocks.input_ids).ok
