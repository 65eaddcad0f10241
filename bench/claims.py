"""Check the papers' resource claims by exact arithmetic; write bench/results/claims.md.

Run: python bench/claims.py   (no weights, no network; same table as `shrink claims --markdown`)
"""

from pathlib import Path

from shrink.analysis.claims import check_claims, to_markdown

COMMAND = "python bench/claims.py"
OUT = Path(__file__).resolve().parent / "results" / "claims.md"


def main() -> None:
    table = to_markdown(check_claims())
    print(table, end="")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        "# Paper claims vs exact arithmetic\n\n"
        f"Produced by `{COMMAND}` (equivalently `shrink claims --markdown`); pure arithmetic from the\n"
        "models' configs (shrink/estimate.py), no weights loaded.\n\n" + table
    )
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
