"""Hydra sets the root logger to INFO; keep library chatter (JAX backend probing, orbax's
per-save messages) out of the run's output."""
import logging


def quiet_library_logs() -> None:
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
