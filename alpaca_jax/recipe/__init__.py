"""The recipe layer: a run is a list of stages (`stages.STAGES`, registered by name) over one
state, with one settings schema (`settings.Job`), checks before any work (`checks`), a
fingerprint store that resumes (`store`), and one results shape (`run`). Every Hydra app in
`experiments/` is this run under a preset."""
from alpaca_jax.recipe.settings import Job


def run(job, run_dir, resolved: dict) -> dict:
    from alpaca_jax.recipe.runner import run as _run

    return _run(job, run_dir, resolved)


__all__ = ["Job", "run"]
