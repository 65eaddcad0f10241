"""Build recipes: a YAML file (or a recipe shipped with shrink) as a validated BuildConfig."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from shrink.core.errors import ShrinkError
from shrink.stages.configs import BuildConfig, describe
from shrink.stages.pipeline import stage_names


def load_recipe(path_or_name: str) -> tuple[BuildConfig, str]:
    """A YAML recipe (a path, or the name of a recipe shipped with shrink) as a BuildConfig, and
    its text. Unknown keys, wrong types and impossible values name the key path."""
    from shrink.core.yamlsafe import load_yaml_mapping, read_text_bounded

    p = Path(path_or_name).expanduser()
    if not p.exists() or p.is_dir():  # a FIFO or a device is read (and refused) below
        shipped = resources.files("shrink") / "recipes" / f"{path_or_name}.yaml"
        if not shipped.is_file():
            names = sorted(
                f.name[:-5]
                for f in (resources.files("shrink") / "recipes").iterdir()
                if f.name.endswith(".yaml")
            )
            raise ShrinkError(
                f"no recipe '{path_or_name}': give a YAML file or one of {', '.join(names)}"
            )
        text = shipped.read_text()
    else:
        text = read_text_bounded(p, f"recipe {path_or_name}")
    data = load_yaml_mapping(text, f"recipe {path_or_name}")
    data.pop("description", None)
    return recipe_config(data, str(path_or_name)), text


def recipe_config(data: dict, where: str = "recipe") -> BuildConfig:
    """Settings (nested by stage) as a BuildConfig; the section of a stage added through
    :func:`shrink.stages.pipeline.register_stage` goes to ``registered``."""
    data = dict(data)
    extra = [k for k in stage_names() if k not in BuildConfig.model_fields and k in data]
    if extra:
        data["registered"] = {**(data.get("registered") or {}), **{k: data.pop(k) for k in extra}}
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as e:
        raise ShrinkError(f"{where}: {describe(e)}") from None
