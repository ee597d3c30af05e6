"""Evaluation: perplexity on our corpora (perplexity.py, our documented protocol) and
lm-evaluation-harness tasks through our model (harness.py, imported on demand: it imports lm_eval;
the offline task YAMLs are in tasks/)."""
from alpaca_jax.eval.perplexity import perplexity, token_nll

__all__ = ["perplexity", "token_nll"]
