"""Host memory of loading and exporting a ~1B checkpoint, and XLA's temporaries of a train step.

    python benchmarks/bench_memory.py io [--dir /tmp/bench_memory]   # load / export peak RSS
    python benchmarks/bench_memory.py temps [--code ROOT]            # train-step temporaries

`io` writes a random bf16 LLaMA (hidden 2048, 16 layers, FFN 5632, vocab 32000, 16 heads:
0.95B parameters, 1.78 GiB) as six safetensors shards, then runs each step in a fresh child
process that reports its own peak RSS (VmHWM of /proc/self/status, as
`alpaca_jax/export/runtime.py` does for llama.cpp) and its RSS after imports (the baseline):
  load      load_model(dir): params must stay bf16; peak <= 1.3x the checkpoint's bytes
  q8_0      load_model + to_gguf(Q8_0): peak <= params + 1.5x the largest tensor
  f32       load_gguf(the Q8_0 file, float32) + to_gguf(F32): the same bound
`temps` compiles one AdamW train step (compile only, abstract inputs) per method and remat
setting and prints XLA's temp bytes as a multiple of the fp32 block weights. `--code ROOT` runs
it against another checkout (the "before" column): only APIs both have are used.
Prints JSON lines; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
           num_heads=16, num_kv_heads=16)
GiB = 1 << 30


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---- io ---------------------------------------------------------------------------------------

def write_checkpoint(out: Path, shards: int = 6, seed: int = 0) -> dict:
    """A random bf16 HF checkpoint, tensor by tensor (never the whole model in memory)."""
    import ml_dtypes
    import numpy as np

    from alpaca_jax.config import ModelConfig
    from alpaca_jax.io.hf import _hf_names, config_to_hf
    from alpaca_jax.io.safetensors_io import write_streaming
    from alpaca_jax.model.params import checkpoint_layer_shapes

    cfg = ModelConfig(**BIG, bos_token_id=1, eos_token_ids=(2,))
    names = _hf_names()
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = [(names["embed"], (V, D)), (names["final_norm"], (D,)), (names["lm_head"], (V, D))]
    shapes = checkpoint_layer_shapes(cfg)
    for i in range(cfg.num_layers):
        specs += [(t.format(i=i), shapes[ours]) for ours, t in names["layers"].items()]
    total = sum(int(np.prod(s)) * 2 for _, s in specs)
    rng = np.random.default_rng(seed)

    def make(name):
        shape = dict(specs)[name]
        if "norm" in name:
            return np.ones(shape, ml_dtypes.bfloat16)
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

    out.mkdir(parents=True, exist_ok=True)
    groups, cur, size = [], [], 0
    for name, shape in specs:
        cur.append((name, shape, np.dtype(ml_dtypes.bfloat16)))
        size += int(np.prod(shape)) * 2
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        write_streaming(out / fname, group, make, metadata={"format": "pt"})
        weight_map.update({name: fname for name, _, _ in group})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf))
    return {"bytes": total, "shards": len(groups), "tensors": len(specs)}


def _largest_tensor_bytes(params) -> int:
    """The largest single tensor of the model in the params' dtype (a layer slice of a stacked
    leaf counts as one tensor, as in the checkpoint)."""
    import jax
    import numpy as np

    sizes = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        per = x.shape[1:] if "layers" in jax.tree_util.keystr(path) else x.shape
        sizes.append(int(np.prod(per)) * x.dtype.itemsize)
    return max(sizes)


def io_child(step: str, d: Path) -> dict:
    import jax
    import numpy as np

    from alpaca_jax import load_model
    from alpaca_jax.export.gguf_out import to_gguf
    from alpaca_jax.io.gguf_in import load_gguf
    from alpaca_jax.tokenizer.spm import SpmVocabTokenizer  # noqa: F401 (in the baseline)

    base = rss_kb("VmRSS")
    t = time.perf_counter()
    if step == "f32":
        params, cfg, _ = load_gguf(d / "model-q8_0.gguf")
    else:
        params, cfg, _ = load_model(str(d / "hf"))
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t
    after_load = rss_kb("VmHWM")
    nbytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))
    dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)})
    out = {"step": step, "params_bytes": nbytes, "params_dtypes": dtypes, "load_s": load_s,
           "baseline_rss_kb": base, "load_peak_kb": after_load,
           "largest_tensor_bytes": _largest_tensor_bytes(params)}
    if step in ("q8_0", "f32"):
        tok = _tokenizer(cfg)
        out["before_export_rss_kb"] = rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS: export's own peak
        t = time.perf_counter()
        path = d / ("model-q8_0.gguf" if step == "q8_0" else "model-f32.gguf")
        to_gguf(params, cfg, tok, path, step.upper())
        out["export_s"] = time.perf_counter() - t
        out["file_bytes"] = path.stat().st_size
        out["export_peak_kb"] = rss_kb("VmHWM")
    out["peak_rss_kb"] = max(rss_kb("VmHWM"), after_load)
    del np
    return out


def _tokenizer(cfg):
    """An SPM vocabulary of the model's size (the export embeds a tokenizer)."""
    from alpaca_jax.tokenizer.spm import CONTROL, NORMAL, SpmVocabTokenizer

    pieces = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, cfg.vocab_size)]
    types = [CONTROL] * 3 + [NORMAL] * (cfg.vocab_size - 3)
    return SpmVocabTokenizer(pieces, [0.0] * cfg.vocab_size, types, bos_id=1, eos_id=2,
                             unk_id=0)


def run_io(d: Path) -> list[dict]:
    if not (d / "hf" / "config.json").exists():
        info = write_checkpoint(d / "hf")
        print(json.dumps({"checkpoint": str(d / "hf"), **info}), flush=True)
    ckpt = sum(f.stat().st_size for f in (d / "hf").glob("*.safetensors"))
    rows = []
    for step in ("load", "q8_0", "f32"):
        proc = subprocess.run([sys.executable, __file__, "io-child", step, "--dir", str(d)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["checkpoint_bytes"] = ckpt
        peak, base = r["peak_rss_kb"] * 1024, r["baseline_rss_kb"] * 1024
        if step == "load":
            r["bound"] = "peak <= 1.3 x checkpoint"
            r["ratio_peak"] = peak / ckpt
            r["ratio_above_baseline"] = (peak - base) / ckpt
        else:
            allowed = r["params_bytes"] + 1.5 * r["largest_tensor_bytes"]
            r["bound"] = "peak <= params + 1.5 x largest tensor"
            r["allowed_bytes"] = allowed
            r["peak_over_allowed"] = peak / allowed
            r["above_baseline_over_allowed"] = (peak - base) / allowed
            r["export_peak_over_allowed"] = r["export_peak_kb"] * 1024 / allowed
            r["export_above_baseline_over_allowed"] = (r["export_peak_kb"] * 1024 - base) / allowed
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


# ---- train-step temporaries ------------------------------------------------------------------

TEMPS_MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=4,
                   num_heads=8, num_kv_heads=8)
METHODS = ("lora", "lora_bf16", "qat_q8_0_lora", "qat_q4_0_lora", "full")


def step_temporaries(method: str, remat: bool, model: dict = TEMPS_MODEL, batch: int = 1,
                     seq: int = 128) -> dict:
    """XLA's compiled memory of one AdamW train step (compile only, nothing allocated beyond
    the small init): temp bytes and the fp32 block weights' bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from alpaca_jax.config import ModelConfig
    from alpaca_jax.model.params import LAYER_KERNELS, init_params
    from alpaca_jax.peft import add_lora, is_adapter
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_train_step

    cfg = ModelConfig(**model).replace(remat=remat)
    params = init_params(cfg, jax.random.PRNGKey(0))
    materialize, pred = None, is_adapter
    if method == "full":
        pred = train_all
    else:
        params = add_lora(params, cfg, jax.random.PRNGKey(1), rank=8, alpha=16.0)
    if method == "lora_bf16":
        cfg = cfg.replace(compute_dtype="bfloat16")
    if method.startswith("qat_"):
        from alpaca_jax.quant import FakeQuant, QuantSpec
        materialize = FakeQuant.from_spec(QuantSpec(method.split("_")[1] + "_" +
                                                    method.split("_")[2]), cfg)
    trainable, frozen = split(params, pred)
    opt = optax.adamw(1e-4)
    opt_state = opt.init(trainable)
    step = (make_train_step(cfg, opt) if materialize is None
            else make_train_step(cfg, opt, materialize))
    tokens = np.zeros((1, batch, seq), np.int32)
    b = {"tokens": tokens, "loss_mask": np.ones((1, batch, seq), np.float32),
         "segment_ids": np.ones((1, batch, seq), np.int32),
         "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy()}
    ma = step.lower(trainable, frozen, opt_state, b, jnp.int32(0)).compile().memory_analysis()
    weights = sum(int(np.prod(params["layers"][k].shape)) * 4 for k in LAYER_KERNELS)
    return {"method": method, "remat": remat, "temp_bytes": int(ma.temp_size_in_bytes),
            "block_weight_bytes": weights,
            "temp_over_weights": ma.temp_size_in_bytes / weights}


def run_temps(code: str | None) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = code or str(ROOT)
    for remat in (False, True):
        for method in METHODS:
            proc = subprocess.run([sys.executable, __file__, "temps-child", method]
                                  + (["--remat"] if remat else []),
                                  capture_output=True, text=True, env=env, cwd=code or ROOT)
            if proc.returncode:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["code"] = code or str(ROOT)
            print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["io", "temps", "io-child", "temps-child"])
    ap.add_argument("arg", nargs="?")
    ap.add_argument("--dir", default="/tmp/bench_memory")
    ap.add_argument("--code", default=None, help="repository root to import alpaca_jax from")
    ap.add_argument("--remat", action="store_true")
    a = ap.parse_args()
    if a.what == "io":
        run_io(Path(a.dir))
    elif a.what == "io-child":
        print(json.dumps(io_child(a.arg, Path(a.dir))))
    elif a.what == "temps":
        run_temps(a.code)
    else:
        print(json.dumps(step_temporaries(a.arg, a.remat)))


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(":")[0] or str(ROOT))
    main()
