"""Claims check: every claim gets a verdict; the FLOPs claims are wrong by ~4.6x."""

import json

from click.testing import CliRunner

from shrink.analysis.claims import check_claims, to_markdown, verdict_for
from shrink.cli.commands.claims import command as claims_cmd


def by_claim(checks, words):
    (match,) = [c for c in checks if all(w in c.claim for w in words)]
    return match


def test_verdict_rule():
    assert verdict_for(1.0) == "holds"
    assert verdict_for(1.09) == "holds"
    assert verdict_for(0.85) == "approximately"
    assert verdict_for(1.24) == "approximately"
    assert verdict_for(0.7) == "wrong"
    assert verdict_for(0.218) == "wrong"


def test_every_claim_has_a_verdict_and_tolerance():
    checks = check_claims()
    assert len(checks) >= 8
    for c in checks:
        assert c.verdict in {"holds", "approximately", "wrong"}
        assert c.tolerance and c.note and c.source
        if c.ratio is not None:
            assert c.ratio == c.stated / c.exact
            assert verdict_for(c.ratio) == c.verdict


def test_gromov_memory_claims_hold():
    checks = check_claims()
    fp16 = by_claim(checks, ["140 GB"])
    assert fp16.verdict == "holds" and round(fp16.exact, 2) == 137.95
    q4 = by_claim(checks, ["17.5 GB"])
    # 17.5 / 18.84 = 0.929: within 10%
    assert q4.verdict == "holds" and round(q4.exact, 2) == 18.84


def test_gromov_flops_claims_are_wrong_by_4_6x():
    checks = check_claims()
    dense = by_claim(checks, ["3e10"])
    # exact matmul FLOPs of Llama-2-70B: 2 * (80 * 855,638,016 + 8192 * 32000) = 1.374e11
    assert dense.exact == 2 * (
        80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 8192 * 32000
    )
    assert dense.verdict == "wrong"
    assert "low by 4.6x" in dense.note
    pruned = by_claim(checks, ["1.5e10"])
    assert pruned.verdict == "wrong" and "low by 4.6x" in pruned.note
    halving = by_claim(checks, ["halves"])
    assert halving.verdict == "holds" and abs(halving.exact - 0.5) < 0.01


def test_consumer_gpu_claim_names_the_cards():
    c = by_claim(check_claims(), ["consumer GPUs"])
    assert c.verdict == "holds"
    fits, misses = c.note.split("Does not fit:")
    for card in ("RTX 3090", "RTX 4090", "RTX 5090"):
        assert card in fits
    for card in ("RTX 3060", "RTX 4060 Ti"):
        assert card in misses
    assert "10%" in c.tolerance


def test_shortgpt_claims():
    checks = check_claims()
    params = by_claim(checks, ["13B", "parameters"])
    assert params.verdict == "holds"
    assert round(params.exact, 3) == round(1 - 9.844 / 13.016, 3)  # 24.4%
    assert "24.4%" in params.note
    compute = by_claim(checks, ["13B", "compute"])
    assert compute.verdict == "holds"
    assert any(c.bench and c.bench.startswith("shrink bench") for c in checks)


def test_markdown_table():
    checks = check_claims()
    md = to_markdown(checks)
    assert "holds within 10%, approximately within 25%" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(checks) + 1  # header + one row per claim
    assert "**wrong**" in md and "low by 4.6x" in md


def test_cli_claims():
    runner = CliRunner()
    result = runner.invoke(claims_cmd, [])
    assert result.exit_code == 0, result.output
    assert "wrong" in result.output and "holds" in result.output
    result = runner.invoke(claims_cmd, ["--markdown"])
    assert result.exit_code == 0 and result.output == to_markdown(check_claims())
    result = runner.invoke(claims_cmd, ["--json", "-"])
    data = json.loads(result.output)["result"]
    assert {d["verdict"] for d in data} <= {"holds", "approximately", "wrong"}
    assert len(data) == len(check_claims())
