"""What every entry point shares: the Hydra wiring (typed config at the boundary, the run dir)
and quiet library logs (Hydra sets the root logger to INFO, which surfaces JAX's backend probing
and orbax's per-save messages)."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from experiments.schema import register, to_dataclass

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # absolute: Hydra resolves a
# relative config_path against the defining module, which here is a package module


def quiet_library_logs() -> None:
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hydra_app(config_name: str, schema, run):
    """A Hydra main that converts the composed config to `schema` and calls
    `run(job, run_dir, resolved_config_dict)`."""
    register()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg) -> None:
        quiet_library_logs()
        run(to_dataclass(cfg, schema), Path(HydraConfig.get().runtime.output_dir),
            OmegaConf.to_container(cfg, resolve=True))

    return main
