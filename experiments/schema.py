"""Typed Hydra schemas: an unknown key or a wrong type fails at composition, before any compute.
The library never sees a DictConfig; `to_dataclass` converts at the boundary."""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class ModelSourceCfg:
    source: str = "smollm2-135m-instruct"  # registered name, HF directory, .gguf, or hub id
    compute_dtype: str = "float32"


@dataclass
class EvalCfg:
    corpora: list[str] = field(default_factory=lambda: ["wiki", "tiny"])
    ctx_len: int = 512
    max_tokens: int = 4096   # first N tokens of each corpus (the 2-core CPU budget)
    batch_size: int = 8
    # false: documents with markup (<doc> lines, <|endoftext|>) removed, joined by blank lines.
    # true: the file as it is on disk, special tokens parsed (how ASSETS.md's figures were taken).
    raw_text: bool = False
    prompts: list[str] = field(default_factory=lambda: ["What is the capital of France?"])
    chat: bool = True
    max_new_tokens: int = 48


@dataclass
class EvaluateJob:
    model: ModelSourceCfg = field(default_factory=ModelSourceCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateJob)


def to_dataclass(cfg, cls):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))
