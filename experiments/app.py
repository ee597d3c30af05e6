"""What every entry point shares: the Hydra wiring (the typed schema `alpaca_jax.recipe.Job` at
the boundary, the run dir) and quiet library logs (Hydra sets the root logger to INFO, which
surfaces JAX's backend probing and orbax's per-save messages). Every app is the one recipe run
(`alpaca_jax.recipe.run`) under a preset config (`conf/<app>.yaml`)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from alpaca_jax.recipe.settings import Job  # noqa: E402

CONF_DIR = str(ROOT / "conf")  # absolute: Hydra resolves a relative config_path against the
# defining module, which here is a package module


def quiet_library_logs() -> None:
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def to_job(cfg) -> Job:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Job), cfg))


def register_schema() -> None:
    """`job_schema` (the `Job` dataclass) in Hydra's config store, for the presets' defaults."""
    ConfigStore.instance().store(name="job_schema", node=Job)


def hydra_app(config_name: str, preset=None, after=None):
    """A Hydra main over `conf/<config_name>.yaml`: the composed config becomes a `Job`;
    `preset(job)` (an alias's stage list) may fill in what the YAML leaves to it; then the
    recipe runs in Hydra's run dir and `after(results)` reports."""
    register_schema()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg) -> None:
        from alpaca_jax.recipe import run

        quiet_library_logs()
        job = to_job(cfg)
        if preset is not None:
            job = preset(job)
        results = run(job, Path(HydraConfig.get().runtime.output_dir),
                      OmegaConf.to_container(cfg, resolve=True))
        if after is not None:
            after(results)

    return main


def translate(argv: list[str], renames: dict) -> list[str]:
    """Command-line overrides with an alias's old keys renamed (`eval.corpus=wiki` ->
    `eval.corpora=[wiki]`); a rename is `new_key` or a function of the value returning the new
    override(s)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        new = renames.get(key.lstrip("+~")) if eq else None
        if new is None:
            out.append(arg)
        elif callable(new):
            out.extend(new(value))
        else:
            out.append(f"{new}={value}")
    return out
