"""The `custom_dataset` hook of the YAMLs in this folder (lm-eval imports it by file path)."""
from alpaca_jax.eval.foundry import load_dataset  # noqa: F401
