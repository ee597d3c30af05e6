"""`ModelConfig`: the static description of a LLaMA-family decoder.

Frozen (hashable), so it can be a static argument of `jax.jit`. It holds architecture plus
the switches that change the compiled program (compute dtype, remat policy, attention kernel);
parameter dtype is a property of the params pytree itself, chosen at init or load time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROPE_SCALING_TYPES = ("linear", "llama3")
COMPUTE_DTYPES = ("float32", "bfloat16")
# What the backward pass keeps of each block (`model/remat.py`): `none` keeps every activation
# autodiff wants; `block` recomputes the whole block (JAX's `nothing_saveable`); the others are
# `jax.checkpoint_policies` of the same name (matmul outputs kept, in device or host memory).
REMAT_POLICIES = ("none", "block", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "offload_dot_with_no_batch_dims")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as `transformers` defines it (`rope_type` linear or llama3)."""

    rope_type: str
    factor: float
    # llama3 only:
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_SCALING_TYPES)} (or no scaling)"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    compute_dtype: str = "float32"
    remat: str = "none"          # one of REMAT_POLICIES; True/False mean "block"/"none"
    attention: str = "auto"      # auto: cuDNN on a GPU in bf16, XLA otherwise

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"ModelConfig.compute_dtype={self.compute_dtype!r}; supported: {COMPUTE_DTYPES}"
            )
        if isinstance(self.remat, bool):    # the switch's earlier, boolean form
            object.__setattr__(self, "remat", "block" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; supported: {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}; supported: {ATTENTION_IMPLS}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}; known: {sorted(known)}")
        return cls(**d)
