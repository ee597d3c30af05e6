"""Reading a finished run: its `results.json` and `recipe`, checked, and the artefacts its
heal stage left (the adapter directory, the full fine-tuning checkpoint). The model itself is
rebuilt by `alpaca_jax.recipe.replay`, through the same stage registry that built it.
"""
from __future__ import annotations

import json
from pathlib import Path


class RunFormatError(ValueError):
    """A run directory whose results.json is missing, malformed or incomplete."""


def read_results(run_dir) -> dict:
    """The parsed `results.json` of `run_dir` (or the .json file `run_dir` names), with a clear
    error naming the file when it is missing or is not the JSON object a run writes."""
    path = Path(run_dir)
    if path.suffix != ".json":
        path = path / "results.json"
    if not path.is_file():
        raise RunFormatError(f"{path}: no such file (is {run_dir} a finished run directory?)")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(res, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(res).__name__}")
    return res


def run_recipe(run_dir) -> dict:
    """The `recipe` of a run's results.json, checked for the keys the rebuild needs."""
    res = read_results(run_dir)
    path = Path(run_dir) / "results.json"
    recipe = res.get("recipe")
    if not isinstance(recipe, dict):
        raise RunFormatError(f"{path}: no 'recipe' object (stage {res.get('stage')!r}); only "
                             f"finetune/prune runs record how to rebuild their model")
    for key in ("base", "finetune"):
        if key not in recipe:
            raise RunFormatError(f"{path}: recipe has no {key!r}")
    from alpaca_jax.peft import PEFT_METHODS

    if recipe["finetune"] not in ("none", "full", *PEFT_METHODS):
        raise RunFormatError(f"{path}: recipe.finetune={recipe['finetune']!r} is not one of "
                             f"none, full, {', '.join(PEFT_METHODS)}")
    prune = recipe.get("prune")
    if prune is not None and not (isinstance(prune, dict) and isinstance(prune.get("pruned"), list)
                                  and all(isinstance(i, int) for i in prune["pruned"])):
        raise RunFormatError(f"{path}: recipe.prune has no list of removed blocks 'pruned'")
    return recipe


def adapter_dir(run_dir: Path, recipe: dict) -> Path:
    recorded = recipe.get("adapter_dir")
    for cand in ([Path(recorded)] if recorded else []) + [run_dir / "adapter"]:
        if cand.is_dir():
            return cand   # the recorded path, or the run's own copy when the run dir moved
    raise RunFormatError(f"{run_dir}: recipe.finetune={recipe['finetune']!r} but no adapter "
                         f"directory ({recorded} nor {run_dir / 'adapter'})")


def check_artefacts(run_dir: Path, recipe: dict) -> None:
    """The files the heal stage's replay will read are there: checked before the base model
    loads (minutes for a 7B model), so a moved or half-copied run dir fails at once."""
    if recipe["finetune"] == "full":
        steps = [p for p in (run_dir / "checkpoints").glob("*/*") if p.name.isdigit()]
        if not steps:
            raise RunFormatError(f"{run_dir}: recipe.finetune='full' but "
                                 f"{run_dir / 'checkpoints'} holds no checkpoint")
    elif recipe["finetune"] != "none":
        adapter_dir(run_dir, recipe)


def restore_full(params: dict, run_dir: Path) -> dict:
    """The best-validation checkpoint of a full fine-tuning run (the latest when it kept none)."""
    from alpaca_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        got = ckpt.restore_best({"trainable": params})
        if got is None:
            got = ckpt.restore_latest(None)   # as saved; only "trainable" is used
    finally:
        ckpt.close()
    if got is None:
        raise RunFormatError(f"{run_dir}: recipe.finetune='full' but {run_dir / 'checkpoints'} "
                             f"holds no checkpoint")
    return got[1]["trainable"]
