from alpaca_jax.eval.perplexity import perplexity, token_nll

__all__ = ["perplexity", "token_nll"]
