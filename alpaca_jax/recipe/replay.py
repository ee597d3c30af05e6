"""A finished run's final model, rebuilt by replaying its recorded stages (`recipe.order`)
through the stage registry: the base model, then each stage's `replay` (prune drops the blocks
it removed, heal loads the adapter it wrote or its best full fine-tuning checkpoint, quantize
sets the grid it was evaluated on). Runs written before stages were recorded (finetune and prune
runs) replay as prune, heal, quantize."""
from __future__ import annotations

from pathlib import Path


def replay(run_dir, sharding=None):
    """The `State` of a finished run's final model: params (adapters added, not merged),
    cfg, tokenizer, its transform, and its lineage (prune, quant, finetune, adapter_dir).
    `sharding`: where the base model's tensors go as they are read (`io/layout.py`), so the
    replayed stages run where the caller's mesh is."""
    from alpaca_jax.io.registry import load_model
    from alpaca_jax.io.run_model import check_artefacts, run_recipe
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.recipe.stages import STAGES, State

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    check_artefacts(run_dir, recipe)
    params, cfg, tok = load_model(recipe["base"], sharding=sharding)
    st = State(job=None, run_dir=run_dir, stages=[], params=params, cfg=cfg, tok=tok,
               transform=adapted)
    st.base, st.order = recipe["base"], list(recipe.get("order") or ["prune", "heal", "quantize"])
    for name in st.order:
        if name in STAGES and STAGES[name].replay is not None:
            STAGES[name].replay(st, recipe, run_dir)
    st.adapter_dir = recipe.get("adapter_dir")
    return st, recipe


def load_run_model(run_dir, sharding=None):
    """`(params, cfg, tokenizer, recipe)` of a finished run's final model."""
    st, recipe = replay(run_dir, sharding)
    return st.params, st.cfg, st.tok, recipe
