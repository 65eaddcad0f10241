"""shrink is a guest in its user's program: importing it and calling it leaves transformers'
logging level, Python's warning filters, logger levels and the environment as they were."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap


def test_import_and_score_leave_global_state_unchanged(tiny_model_dir):
    folder = tiny_model_dir("llama")
    code = textwrap.dedent(f"""
        import logging, os, warnings
        import torch, transformers  # the host program's own imports (torch adds filters)
        from transformers import AutoModelForCausalLM
        # the host has used transformers already: lazy imports inside torch (sympy, the LR
        # schedulers) add their own warning filters on first use, which is not shrink's doing
        AutoModelForCausalLM.from_pretrained({str(folder)!r})
        transformers.logging.set_verbosity_info()
        before = (transformers.logging.get_verbosity(), list(warnings.filters),
                  {{n: logging.getLogger(n).level for n in ("torchao", "huggingface_hub", "torch.onnx")}},
                  dict(os.environ))
        import shrink
        from shrink.stages.configs import ScoreConfig
        scores = shrink.score({str(folder)!r}, ScoreConfig(samples=2, seq_len=16),
                              show_progress=False)
        assert len(scores.bi) == 6
        after = (transformers.logging.get_verbosity(), list(warnings.filters),
                 {{n: logging.getLogger(n).level for n in ("torchao", "huggingface_hub", "torch.onnx")}},
                 dict(os.environ))
        for name, a, b in zip(("verbosity", "warnings", "loggers", "environ"), before, after):
            assert a == b, (name, a, b)
        print("unchanged")
    """)
    env = {k: v for k, v in os.environ.items() if k != "SHRINK_NO_PROGRESS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("unchanged")


def test_quiet_helpers_restore_what_they_change():
    import warnings

    import transformers

    from shrink.core.quiet import env, third_party_quiet

    transformers.logging.set_verbosity_warning()
    level = logging.getLogger("torchao").level
    filters = list(warnings.filters)
    with third_party_quiet():
        assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    assert transformers.logging.get_verbosity() == transformers.logging.WARNING
    assert logging.getLogger("torchao").level == level and warnings.filters == filters
    os.environ.pop("SHRINK_TEST_SET", None)
    with third_party_quiet():  # a library that sets variables on import (GPTQModel does)
        os.environ["SHRINK_TEST_SET"] = "1"
    assert "SHRINK_TEST_SET" not in os.environ
    os.environ.pop("SHRINK_TEST_VAR", None)
    with env(SHRINK_TEST_VAR="1"):
        assert os.environ["SHRINK_TEST_VAR"] == "1"
    assert "SHRINK_TEST_VAR" not in os.environ


def test_every_public_name_resolves():
    """shrink's lazy API names only things that exist (a typo would fail on first use)."""
    import importlib

    import shrink

    missing = [n for n in shrink.__all__ if not hasattr(importlib.import_module(shrink._API[n]), n)]
    assert missing == []
