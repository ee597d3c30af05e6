"""GGUF export of a real model against llama.cpp: prints figures, asserts nothing.

    python benchmarks/parity_export.py [--model smollm2-135m-instruct] [--tokens 512]
        [--qtypes Q8_0,Q4_0,Q6_K,Q5_K_M,Q4_K_M]

1. F32 export run by llama.cpp (F32 KV cache) vs the JAX forward: max |logit diff|.
2. Our files (formats and K-quant file types) vs llama.cpp's own quantization
   (`llama_model_quantize`) of our F32 export: how many tensors differ in type or bytes.
3. KL(llama.cpp || JAX) per position over wiki tokens for each file, against the JAX
   fake-quant model with llama.cpp's activation rounding emulated, weights only, and float.
4. The rounding-chaos floor: the emulation against itself with every quantized matmul's input
   moved up by one ulp. Rounding activations to 8 bits is discontinuous, so ulp-level differences
   in the float ops between matmuls (which no two implementations avoid) move codes now and then
   and grow through the blocks; an end-to-end KL near this floor is as close as two correct
   implementations get.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--qtypes", default="Q8_0,Q4_0,Q6_K,Q5_K_M,Q4_K_M",
                    help="formats and llama.cpp file types to compare")
    args = ap.parse_args()

    import gguf
    import llama_cpp

    from alpaca_jax import forward, load_model
    from alpaca_jax.data.corpora import load_documents
    from alpaca_jax.eval.perplexity import perplexity_of_logits
    import jax.numpy as jnp

    from alpaca_jax.export import to_gguf
    from alpaca_jax.export.runtime import open_llama
    from alpaca_jax.export.runtime import kl_stats
    from alpaca_jax.provenance import git_sha
    from alpaca_jax.quant import FakeQuant, QuantSpec

    @dataclasses.dataclass(frozen=True)
    class OneUlpUp(FakeQuant):
        """The emulation with every quantized matmul's input moved up by one ulp."""
        def linear(self, x, tree, name, *, rng=None):
            return super().linear(jnp.nextafter(x, jnp.full_like(x, jnp.inf)), tree, name,
                                  rng=rng)

    params, cfg, tok = load_model(args.model)
    ids = tok.encode("\n\n".join(load_documents("wiki")[:40]), bos=False,
                     parse_special=False)[: args.tokens]
    n = len(ids)
    print(f"model={args.model} commit={git_sha()} tokens={n} (wiki, no BOS, one window; "
          f"llama.cpp with an F32 KV cache, 2 threads)")

    def run_llama(path):
        llm = open_llama(path, repack=False, n_ctx=n, n_batch=n, logits_all=True,
                         n_threads=2, type_k=0, type_v=0)
        llm.eval(ids)
        return np.asarray(llm.scores[:n], np.float32)

    def jax_logits(materialize=None):
        kw = {} if materialize is None else {"materialize": materialize}
        return np.asarray(forward(params, np.array([ids]), cfg, **kw)[0][0])

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f32 = to_gguf(params, cfg, tok, d / "f32.gguf", "F32")
        ref, fl = run_llama(f32), jax_logits()
        print(f"F32: max |logit diff| {np.abs(ref - fl).max():.3g} on a logit scale of "
              f"{np.abs(fl).max():.1f}")
        for qtype in args.qtypes.split(","):
            ours = to_gguf(params, cfg, tok, d / f"{qtype}.gguf", qtype)
            theirs = d / f"{qtype}-llama.gguf"
            qp = llama_cpp.llama_model_quantize_default_params()
            qp.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(),
                                                  qp) == 0
            a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
            b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
            differ = [k for k in a if a[k].tensor_type != b[k].tensor_type
                      or not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))]
            print(f"{qtype}: {len(differ)} of {len(a)} tensors differ from llama.cpp's own "
                  f"{qtype} quantization of the F32 export {differ[:3]}")
            ref = run_llama(ours)
            emulated = FakeQuant.from_spec(QuantSpec(qtype.lower(), activations=True), cfg)
            for name, m in (("emulated activations", emulated),
                            ("weights only", FakeQuant.from_spec(QuantSpec(qtype.lower()), cfg)),
                            ("float", None)):
                x = jax_logits(m)
                k = kl_stats(ref, x)
                print(f"  llama.cpp {qtype} vs JAX {name:21s}: mean KL {k['kl_mean']:.2e}, p99 "
                      f"{k['kl_p99']:.2e}, max {k['kl_max']:.2e}; argmax agreement "
                      f"{k['argmax_agreement']:.4f}; ppl llama.cpp "
                      f"{perplexity_of_logits(ref, ids):.4f} JAX "
                      f"{perplexity_of_logits(x, ids):.4f}")
            a, b = jax_logits(emulated), jax_logits(OneUlpUp(emulated.formats, True))
            k = kl_stats(a, b)
            print(f"  chaos floor: JAX emulated vs itself with inputs +1 ulp: mean KL "
                  f"{k['kl_mean']:.2e}, p99 {k['kl_p99']:.2e}, max {k['kl_max']:.2e}; argmax "
                  f"agreement {k['argmax_agreement']:.4f}; max |logit diff| "
                  f"{np.abs(a - b).max():.3g}")


if __name__ == "__main__":
    main()
