"""What a run keeps of each stage: `stages/<name>.json` with a fingerprint that chains every
upstream stage's settings, so a re-run in the same run dir reuses a stage only if nothing it
depends on changed (and training resumes from its own checkpoints)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageStore:
    def __init__(self, run_dir: Path):
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chain = ""

    def advance(self, name: str, settings) -> str:
        self.chain = fingerprint(self.chain, name, settings)
        return self.chain

    def load(self, name: str):
        path = self.dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == self.chain:
                print(f"[{name}] reusing {path}", flush=True)
                return saved["output"]
        return None

    def save(self, name: str, output) -> None:
        from alpaca_jax.provenance import write_json_atomic

        write_json_atomic(self.dir / f"{name}.json", {"fingerprint": self.chain,
                                                      "output": output})
