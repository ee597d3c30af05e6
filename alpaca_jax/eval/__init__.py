"""Evaluation: perplexity (the protocol in perplexity.py) and zero-shot accuracy on
llm-foundry's JSONL formats (zeroshot.py)."""
from alpaca_jax.eval.perplexity import perplexity, token_nll
from alpaca_jax.eval.zeroshot import zeroshot

__all__ = ["perplexity", "token_nll", "zeroshot"]
