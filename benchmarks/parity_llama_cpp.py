"""Print how the imported JAX model compares with llama.cpp running the very same GGUF file.

    python benchmarks/parity_llama_cpp.py [--model smollm2-135m-instruct] [--tokens 512]

llama.cpp quantizes activations (Q8_1) for Q4_1 matmuls, so logits cannot be equal; what must
agree is perplexity, the argmax token, and the tokenizer. tests/test_smollm2.py asserts bounds.
"""
from __future__ import annotations

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()

    from llama_cpp import Llama

    from alpaca_jax import forward, load_model
    from alpaca_jax.data.corpora import load_documents
    from alpaca_jax.eval.perplexity import perplexity_of_logits
    from alpaca_jax.io.registry import resolve_registered
    from alpaca_jax.provenance import git_sha

    params, cfg, tok = load_model(args.model)
    text = "\n\n".join(load_documents("wiki")[:40])
    ids = tok.encode(text, bos=False, parse_special=False)[: args.tokens]
    llm = Llama(model_path=str(resolve_registered(args.model)), n_ctx=len(ids), n_batch=len(ids),
                logits_all=True, n_threads=2, verbose=False)
    same_tokens = llm.tokenize(text.encode(), add_bos=False, special=False) == \
        tok.encode(text, bos=False, parse_special=False)
    llm.eval(ids)
    ref = np.asarray(llm.scores[: len(ids)], np.float32)
    got = np.asarray(forward(params, np.array([ids]), cfg)[0][0])

    def ppl(logits):
        return perplexity_of_logits(logits, ids)

    print(f"model={args.model} commit={git_sha()} tokens={len(ids)} (wiki documents, no BOS, "
          f"one window)")
    print(f"tokenizer identical to llama.cpp's on {len(text)} characters: {same_tokens}")
    print(f"perplexity: JAX {ppl(got):.4f}  llama.cpp {ppl(ref):.4f}  "
          f"ratio {ppl(got) / ppl(ref):.5f}")
    print(f"argmax agreement: {(ref.argmax(-1) == got.argmax(-1)).mean():.4f}; max |logit diff| "
          f"{np.abs(ref - got).max():.3f} on a logit scale of {np.abs(ref).max():.1f}")


if __name__ == "__main__":
    main()
