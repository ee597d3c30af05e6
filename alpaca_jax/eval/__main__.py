"""lm-eval's own command line with the `alpaca_jax` model registered (lm-eval discovers models
only among its own modules):

    python -m alpaca_jax.eval run --model alpaca_jax --model_args source=smollm2-135m-instruct \
        --tasks offline_zeroshot --include_path alpaca_jax/eval/tasks
"""
import os

import alpaca_jax.eval.harness  # noqa: F401  (registers the model)
from lm_eval.__main__ import cli_evaluate

# lm-eval's bootstrap stderr forks a process pool; forking JAX's threads can deadlock
os.environ.setdefault("DISABLE_MULTIPROC", "1")

if __name__ == "__main__":
    cli_evaluate()
