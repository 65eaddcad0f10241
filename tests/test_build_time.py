"""bench/build_time.py on a stub build folder: the per-stage arithmetic, floor and ratio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
}


def _module():
    spec = importlib.util.spec_from_file_location("build_time", ROOT / "bench" / "build_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _module_at_1_gflops(monkeypatch):
    """The module with its matmul rate fixed at 1 GFLOP/s, so that floors are FLOPs / 1e9."""
    bt = _module()
    monkeypatch.setattr(
        bt,
        "matmul_rate",
        lambda s: {"flops_per_second": 1e9, "rows": 1, "threads": 1, "per_shape_gflops": {}},
    )
    return bt


def _stub(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    report = {
        "settings": {
            "prune": {"strategy": "auto", "bridge": "auto", "samples": 2, "seq_len": 8},
            "heal": {"steps": 3, "batch_size": 2, "seq_len": 8, "rank": 4},
            "evaluate": {"samples": 1, "seq_len": 16, "second": None},
        },
        "num_layers": [6, 4],
        "perplexity": {"dense": {"path": "src"}, "pruned": {"path": "p"}, "healed": {"path": "h"}},
        "perplexity_book": {
            "ledger": [{"by": "heal", "what": "before"}, {"by": "evaluate", "what": "src"}]
        },
        "stages": [
            {"name": "prune", "seconds": 10.0},
            {"name": "heal", "seconds": 20.0},
            {"name": "evaluate", "seconds": 1.0},
            {"name": "export", "seconds": 3.0},
        ],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_floor_and_ratio_per_stage(tmp_path, monkeypatch):
    bt = _module_at_1_gflops(monkeypatch)
    r = bt.analyse(_stub(tmp_path))
    s = bt.shapes(CONFIG)
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v (2 kv heads); mlp
    assert s["layer_params"] == layer
    P4 = 4 * layer + 64 * 1000
    rows = {x["stage"]: x for x in r["stages"]}
    # causal attention per token of an n-token block: 4 heads x 16 dims, (n + 1) / 2 keys and
    # values on average, 2 FLOPs each, per layer
    att = lambda layers, n: layers * 4 * 64 * (n + 1) / 2  # noqa: E731
    # evaluate computed only the dense model (pruned and healed came from heal's measurements)
    assert rows["evaluate"]["flops"] == (2 * (6 * layer + 64 * 1000) + att(6, 16)) * 16
    lora = 4 * 3 * 4 * (64 + 128)
    train = (4 * P4 + 2 * lora + 3 * att(4, 8)) * 3 * 2 * 8  # forward + backward (2x)
    assert rows["heal"]["flops"] == train + 2 * (2 * P4 + att(4, 16)) * 16
    assert rows["heal"]["floor_s"] == round(rows["heal"]["flops"] / 1e9, 2)
    assert rows["heal"]["ratio"] == round(20.0 / (rows["heal"]["flops"] / 1e9), 2)
    assert rows["export"]["flops"] is None and rows["export"]["ratio"] is None
    assert r["total_wall_s"] == 34.0
    assert "| heal | 20.0 |" in bt.markdown(r)


def test_gguf_export_floor_counts_only_work_done_in_this_build(tmp_path, monkeypatch):
    bt = _module_at_1_gflops(monkeypatch)
    folder = _stub(tmp_path)
    report = json.loads((folder / "report.json").read_text())
    comparison = {
        "this": {"work": {"written": False, "imatrix_tokens": 0, "measured_tokens": 32}},
        "dense": {"work": {"written": True, "imatrix_tokens": 64, "measured_tokens": 32}},
    }
    report["export"] = {
        "gguf": {
            "imatrix": {"tokens": 64, "seq_len": 16, "cached": False},
            "comparison": comparison,
        }
    }
    (folder / "report.json").write_text(json.dumps(report))
    s = bt.shapes(CONFIG)
    P6, P4 = (n * s["layer_params"] + s["head_params"] for n in (6, 4))
    att = lambda layers, n: layers * 4 * 64 * (n + 1) / 2  # noqa: E731
    row = {x["stage"]: x for x in bt.analyse(folder)["stages"]}["export"]
    # imatrix and evaluation blocks are 16 tokens, the check's 256
    this = (2 * P4 + att(4, 16)) * (64 + 32) + (2 * P4 + att(4, 256)) * bt.GGUF_VERIFY_TOKENS
    assert row["flops"] == this + (2 * P6 + att(6, 16)) * (64 + 32)
    assert row["ratio"] == round(3.0 / (row["flops"] / 1e9), 2)
    # a second build: the importance matrix and the dense point come from their caches
    report["export"]["gguf"]["imatrix"]["cached"] = True
    comparison["dense"]["work"] = {"written": False, "imatrix_tokens": 0, "measured_tokens": 0}
    (folder / "report.json").write_text(json.dumps(report))
    row = {x["stage"]: x for x in bt.analyse(folder)["stages"]}["export"]
    assert (
        row["flops"] == (2 * P4 + att(4, 256)) * bt.GGUF_VERIFY_TOKENS + (2 * P4 + att(4, 16)) * 32
    )


def test_refuses_a_folder_without_report(tmp_path):
    assert _module().main([str(tmp_path)]) == 2


def test_auto_candidates_bridge_walks_are_in_the_prune_floor(tmp_path, monkeypatch):
    """Each auto candidate fits its bridges on its own pruned stream: its first bridged layer
    once, then from each bridged layer (again, folded) up to the next one."""
    bt = _module_at_1_gflops(monkeypatch)
    folder = _stub(tmp_path)
    base = {x["stage"]: x for x in bt.analyse(folder)["stages"]}["prune"]["flops"]
    candidates = [
        # runs folded into layers 0 and 3 (layer 1 removed): 1 + layers 0, 2, 3 = 4 passes
        {"layers": [1, 4], "bridge": [{"folded_into": 0}, {"folded_into": 3}]},
        {"layers": [2, 3], "bridge": [{"folded_into": 1}]},  # one run: 1 pass
        {"layers": [0, 1], "bridge": [{"folded_into": None}]},  # not bridged: none
    ]
    record = {"stages": [{"stage": "prune", "calibration": {"auto": {"candidates": candidates}}}]}
    (folder / "model" / "shrink.json").write_text(json.dumps(record))
    row = {x["stage"]: x for x in bt.analyse(folder)["stages"]}["prune"]
    s = bt.shapes(CONFIG)
    layer = 2 * s["layer_params"] + 4 * 64 * (8 + 1) / 2  # one layer, 8-token blocks
    assert row["flops"] == base + 5 * layer * 2 * 8
    assert "5 layer passes" in row["formula"]
