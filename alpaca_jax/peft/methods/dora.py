"""DoRA (HF `peft.tuners.lora` with `use_dora=True`): LoRA's `W + scale * a @ b` with each output
column rescaled to the magnitude `m` `[L, out]` (PEFT's `lora_magnitude_vector`). The column norm
is a constant for autodiff, as in the DoRA paper (section 4.3) and PEFT."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.transform import matmul
from alpaca_jax.peft.methods.lora import LoRA, lora_weight, lowrank


def col_norm(w_eff):
    """Per-output-feature norm of `[.., in, out]` (PEFT's norm over the input dim of `[out, in]`),
    a constant for autodiff as in PEFT's DoRA."""
    n = jnp.sqrt(jnp.sum(jnp.square(w_eff.astype(jnp.float32)), axis=-2))
    return jax.lax.stop_gradient(n)


class DoRA(LoRA):
    name = "dora"
    trainable = ("a", "b", "m")
    hf_config = {"use_dora": True}
    hf_tensors = {**LoRA.hf_tensors, "lora_magnitude_vector": "lora_magnitude_vector"}

    def init(self, key, w, rank):
        """LoRA's, and m = the column norms of W (so the model is unchanged)."""
        return {**super().init(key, w, rank),
                "m": jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=1))}

    def neutral(self, w, rank):
        return {**super().neutral(w, rank),
                "m": np.sqrt(np.sum(np.square(np.asarray(w).astype(np.float32)), axis=1))}

    def shapes(self, L, d_in, d_out, rank):
        return {**super().shapes(L, d_in, d_out, rank), "m": (L, d_out)}

    def weight(self, w, ad):
        w_eff = lora_weight(w, ad)
        w_eff = w_eff * (ad["m"].astype(jnp.float32) / col_norm(w_eff))[..., None, :]
        return w_eff.astype(w.dtype)

    def linear(self, x, w, ad, *, rng=None):
        xd = self.dropped(x, ad, rng)
        base = matmul(x, w)
        low = lowrank(xd, ad["a"], ad["b"]) * ad["scale"].astype(x.dtype)
        g = (ad["m"].astype(jnp.float32) / col_norm(lora_weight(w, ad))).astype(x.dtype)
        if xd is x:
            return g * (base + low)
        # PEFT with dropout: x @ W + (g - 1) * (dropout(x) @ W) + g * lora(dropout(x))
        return base + (g - 1) * matmul(xd, w) + g * low

    def to_hf(self, ad):
        return {**super().to_hf(ad),
                "lora_magnitude_vector": np.asarray(ad["m"], np.float32)}

    def from_hf(self, tensors, d_in, d_out, where):
        m = tensors["lora_magnitude_vector"]
        if m.shape != (d_out,):
            raise ValueError(f"{where}: lora_magnitude_vector {m.shape}, expected ({d_out},)")
        return {**super().from_hf(tensors, d_in, d_out, where), "m": m.astype(np.float32)}
