"""Layer scores equal an independent, straightforward computation from output_hidden_states."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import shrink
from shrink.core.errors import ShrinkError


def _naive(model, ids, mask, skip_first):
    """BI, relmag and angular distance from output_hidden_states, with the final norm replaced by
    an identity so that the last entry is the raw output of the last layer."""
    base = model.model
    norm = base.norm
    base.norm = nn.Identity()
    try:
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        base.norm = norm
    hs = [h.double() for h in hs]
    L = len(hs) - 1
    bi, rel = [], []
    counted = []
    for b in range(ids.shape[0]):
        real = [t for t in range(ids.shape[1]) if mask[b, t]]
        counted.append((b, real[skip_first:], real[-1]))
    total = sum(len(toks) for _, toks, _ in counted)
    for i in range(L):
        s_bi = s_rel = 0.0
        for b, toks, _ in counted:
            for t in toks:
                x, y = hs[i][b, t], hs[i + 1][b, t]
                s_bi += 1 - float(x @ y / (x.norm() * y.norm()))
                s_rel += float((y - x).norm() / y.norm())
        bi.append(s_bi / total)
        rel.append(s_rel / total)
    ang = {}
    for n in range(1, L + 1):
        for l in range(L - n + 1):
            acc = 0.0
            for b, _, last in counted:
                x, y = hs[l][b, last], hs[l + n][b, last]
                c = float(x @ y / (x.norm() * y.norm()))
                acc += math.acos(max(-1.0, min(1.0, c))) / math.pi
            ang[(l, n)] = acc / len(counted)
    return bi, rel, ang


def test_scores_equal_naive_computation(tiny_model_dir, arch):
    loaded = shrink.load_model(str(tiny_model_dir(arch)))
    torch.manual_seed(1)
    ids = torch.randint(3, 49152, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    scores = shrink.score_layers(
        loaded.model, ids, mask, batch_size=2, skip_first=1, show_progress=False
    )
    bi, rel, ang = _naive(loaded.model, ids, mask, skip_first=1)
    assert scores.tokens == int(mask.sum()) - 3
    assert scores.bi == pytest.approx(bi, abs=1e-5)
    assert scores.relmag == pytest.approx(rel, abs=1e-5)
    L = scores.num_layers
    for n in range(1, L + 1):
        assert scores.angular[n - 1] == pytest.approx(
            [ang[(l, n)] for l in range(L - n + 1)], abs=1e-5
        )


def test_skip_first_changes_what_is_counted(tiny_model_dir):
    loaded = shrink.load_model(str(tiny_model_dir("llama")))
    ids = torch.randint(3, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    s0 = shrink.score_layers(loaded.model, ids, skip_first=0, show_progress=False)
    s3 = shrink.score_layers(loaded.model, ids, skip_first=3, show_progress=False)
    assert s0.tokens == 20 and s3.tokens == 14
    assert s0.bi == pytest.approx(_naive(loaded.model, ids, mask, 0)[0], abs=1e-5)
    assert s0.bi != pytest.approx(s3.bi, abs=1e-7)
    assert s0.angular == s3.angular  # angular distance only looks at the last token
    with pytest.raises(ShrinkError, match="no tokens"):
        shrink.score_layers(loaded.model, ids, skip_first=10, show_progress=False)


def test_rankings_and_best_block():
    scores = shrink.LayerScores(
        model="m",
        num_layers=4,
        bi=[0.5, 0.1, 0.1, 0.3],
        relmag=[0.4, 0.3, 0.2, 0.1],
        angular=[[0.3, 0.2, 0.1, 0.4], [0.5, 0.2, 0.6], [0.7, 0.8], [0.9]],
        tokens=10,
        samples=1,
    )
    assert scores.lowest("bi", 2) == [1, 2]
    assert scores.lowest("relmag", 1) == [3]
    assert scores.best_block(1) == (2, 0.1)
    assert scores.best_block(2) == (1, 0.2)
    with pytest.raises(ShrinkError):
        scores.values("ppl")
    assert shrink.LayerScores.from_dict(scores.to_dict()) == scores


def test_removal_perplexity_matches_pruned_model(tiny_model_dir):
    loaded = shrink.load_model(str(tiny_model_dir("llama")))
    ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    dense, deltas = shrink.removal_perplexity(loaded.model, ids, show_progress=False)
    assert len(deltas) == 6
    assert dense == pytest.approx(
        shrink.perplexity(loaded.model, ids, show_progress=False).perplexity
    )
    fresh = shrink.load_model(str(tiny_model_dir("llama")))
    shrink.prune_model(fresh.model, [2])
    ppl2 = shrink.perplexity(fresh.model, ids, show_progress=False).perplexity
    assert deltas[2] == pytest.approx(ppl2 - dense, rel=1e-5)


@pytest.mark.slow
def test_embedded_model_scores_equal_naive(embedded_dir):
    loaded = shrink.load_model("smollm2-135m")
    blocks = shrink.token_blocks(loaded.tokenizer, shrink.CALIBRATION, 2, 24, seed=0)
    mask = torch.ones_like(blocks.input_ids)
    scores = shrink.score_layers(
        loaded.model, blocks.input_ids, batch_size=2, skip_first=1, show_progress=False
    )
    bi, rel, ang = _naive(loaded.model, blocks.input_ids, mask, 1)
    assert scores.num_layers == 30
    assert scores.bi == pytest.approx(bi, abs=1e-5)
    assert scores.relmag == pytest.approx(rel, abs=1e-5)
    assert scores.best_block(6)[1] == pytest.approx(min(ang[(l, 6)] for l in range(25)), abs=1e-5)
