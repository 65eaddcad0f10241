"""Optional lm-evaluation-harness tasks (the ``eval`` extra) for HF and GPTQ artifacts.

Standard tasks (``mmlu``, ``hellaswag``, ...) need their datasets from the hub, so they work where
the user has network or a local datasets cache; custom tasks in a folder of YAML files
(``tasks_path``) can point at local files and run offline.
"""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError, first_line, install_hint

EVAL_EXTRA = install_hint("eval")


def task_manager(tasks: list[str], tasks_path: str | Path | None = None):
    """lm-eval's TaskManager, once the extra, the task folder and every task name are checked
    (listing the tasks takes seconds: build it once per run)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ShrinkError(f"--tasks needs lm-evaluation-harness: {EVAL_EXTRA}") from None
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise ShrinkError(f"--tasks-path '{tasks_path}' is not a folder of task YAML files")
    manager = TaskManager(include_path=str(tasks_path)) if tasks_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ShrinkError(
            f"unknown lm-eval task(s) {', '.join(unknown)} (custom tasks: "
            "--tasks-path DIR with their YAML files)"
        )
    return manager


def run_tasks(
    artifact: str | Path,
    tasks: list[str],
    tasks_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    manager=None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness ``tasks`` on an HF or GPTQ folder; return {task: {metric: value}}.
    ``manager``: a :func:`task_manager` already built for these tasks."""
    from shrink.runtime import kinds
    from shrink.runtime.artifacts import artifact_path

    path = artifact_path(artifact)
    kind = kinds.detect(path)
    if not kind.lm_eval:
        runs = ", ".join(k.name for k in kinds.all_kinds() if k.lm_eval)
        raise ShrinkError(
            f"{artifact}: lm-evaluation-harness tasks run on {runs} artifacts, not {kind.name}"
        )
    if manager is None:
        manager = task_manager(tasks, tasks_path)
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(path),
                "device": device,
                "dtype": "float32" if device == "cpu" else "auto",
            },
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            log_samples=False,
        )
    except Exception as e:  # noqa: BLE001 - dataset downloads and task errors come in many kinds
        line = first_line(e)
        raise ShrinkError(
            f"lm-eval tasks {', '.join(tasks)} failed on {artifact}: {line} "
            "(standard tasks download their datasets: they need network)"
        ) from None
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and not isinstance(v, bool)
        }
    return results
