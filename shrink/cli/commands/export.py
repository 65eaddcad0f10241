"""``shrink export``: ONNX (onnxruntime-genai) and GGUF (llama.cpp) artifacts."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    err,
    model_folder,
    output_options,
    write_json,
)
from shrink.cli.options import config_options
from shrink.stages.configs import ExportConfig


@click.command("export")
@click.argument("model_dir")
@config_options(ExportConfig)
@output_options
def command(model_dir, output, force, no_verify, json_out, **kwargs):
    """Export MODEL_DIR (a Hugging Face or GPTQ folder) for another runtime, verified against
    PyTorch in a fresh process. --onnx writes model.onnx + genai_config.json + tokenizer;
    --gguf writes a GGUF file for llama.cpp, Ollama and LM Studio (the gguf extra)."""
    from shrink.report.summaries import export_lines
    from shrink.stages.export import export

    config = build_config(ExportConfig, kwargs)
    check_writable(json_out)
    quiet = json_out == "-"
    results = export(
        model_folder(model_dir),
        output,
        config,
        force=force,
        verify=not no_verify,
        log=None if quiet else (lambda line: err.print(line, highlight=False)),
    )
    if json_out:
        write_json(
            {k: r if isinstance(r, dict) else r.to_dict() for k, r in results.items()},
            json_out,
            config.settings(),
        )
    if not quiet:
        for line in export_lines(results):
            console.print(line)
