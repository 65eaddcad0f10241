"""lm-evaluation-harness tasks through `shrink bench --tasks`, offline, with a local custom task;
the accuracy equals an independent log-likelihood computation."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from shrink.cli import main
from shrink.core.errors import ShrinkError

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Rome"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1},
    {
        "question": "Emma Woodhouse lived at",
        "choices": ["Hartfield", "Pemberley", "Kellynch"],
        "answer": 0,
    },
    {"question": "The sky is", "choices": ["green", "blue"], "answer": 1},
    {"question": "Mr. Darcy's estate is", "choices": ["Donwell", "Pemberley"], "answer": 1},
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(f"""task: shrink_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def _independent_accuracy(model_dir) -> float:
    """argmax over choices of log p(' ' + choice | question), as lm-eval defines acc."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tok(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(context) :]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_custom_task_matches_independent_loglikelihood(tiny_model_dir, task_dir):
    pytest.importorskip("lm_eval")
    from shrink.runtime.lmeval import run_tasks

    model = tiny_model_dir("llama")
    results = run_tasks(model, ["shrink_tiny_mc"], tasks_path=task_dir)
    assert results["shrink_tiny_mc"]["acc"] == pytest.approx(_independent_accuracy(model))


def test_bench_tasks_cli_and_errors(tiny_model_dir, task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from shrink.runtime.lmeval import run_tasks

    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_model_dir("qwen2")),
            "--repeats",
            "1",
            "--gen-len",
            "2",
            "--prompt-len",
            "8",
            "--ppl-samples",
            "0",
            "--tasks",
            "shrink_tiny_mc",
            "--tasks-path",
            str(task_dir),
            "--json",
            "-",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    tasks = json.loads(r.stdout)["result"]["results"][0]["median"]["tasks"]
    assert 0.0 <= tasks["shrink_tiny_mc"]["acc"] <= 1.0
    with pytest.raises(ShrinkError, match="unknown lm-eval task"):
        run_tasks(tiny_model_dir("llama"), ["no_such_task_xyz"], tasks_path=task_dir)
    with pytest.raises(ShrinkError, match="not a folder"):
        run_tasks(tiny_model_dir("llama"), ["shrink_tiny_mc"], tasks_path=tmp_path / "nope")


def test_bench_checks_tasks_before_timing(tiny_model_dir, task_dir, monkeypatch):
    """A wrong task name fails at once, before any benchmark run."""
    pytest.importorskip("lm_eval")
    import shrink.stages.bench as B

    def no_runs(*args, **kwargs):
        raise AssertionError("a benchmark run started before the tasks were checked")

    monkeypatch.setattr(B, "_run_worker", no_runs)
    with pytest.raises(ShrinkError, match="unknown lm-eval task"):
        B.bench(
            [str(tiny_model_dir("llama"))],
            tasks=["no_such_task_xyz"],
            tasks_path=task_dir,
            show_progress=False,
        )


@pytest.mark.slow
def test_custom_task_on_embedded_model(embedded_dir, task_dir):
    pytest.importorskip("lm_eval")
    from shrink.runtime.lmeval import run_tasks

    acc = run_tasks("smollm2-135m", ["shrink_tiny_mc"], tasks_path=task_dir)["shrink_tiny_mc"][
        "acc"
    ]
    assert acc == pytest.approx(_independent_accuracy(embedded_dir))
    assert acc >= 0.6  # the real model knows most of these
