"""``shrink claims``: the papers' memory/FLOPs claims against exact arithmetic."""

from __future__ import annotations

import click

from shrink.cli.common import console, json_option, write_json


@click.command("claims")
@click.option("--markdown", is_flag=True, help="Print a markdown table instead of a rich table.")
@json_option(
    "Also write the checks as JSON to FILE ('-': print only JSON on stdout).", metavar="FILE|-"
)
def command(markdown, json_out):
    """Check the papers' memory/FLOPs claims (ShortGPT, Gromov et al.) against exact arithmetic."""
    from shrink.analysis.claims import TOLERANCE, check_claims, to_markdown
    from shrink.report.tables import VERDICT_COLORS, claims_table

    checks = check_claims()
    if json_out == "-":
        write_json([c.to_dict() for c in checks], "-")
        return
    if markdown:
        click.echo(to_markdown(checks), nl=False, file=console.file)
    else:
        console.print(claims_table(checks))
        for i, c in enumerate(checks, 1):
            color = VERDICT_COLORS[c.verdict]
            console.print(
                f"{i}. [{color}]{c.verdict}[/]: {c.note}"
                + (f" Measure: {c.bench}" if c.bench else ""),
                highlight=False,
            )
        console.print(
            f"[dim]Verdict rule: stated/exact {TOLERANCE}. Sources: Gromov et al."
            " (arXiv 2403.17887) sec. 5; ShortGPT (arXiv 2403.03853).[/]"
        )
    if json_out:
        write_json([c.to_dict() for c in checks], json_out)
