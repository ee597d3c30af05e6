"""Adapters in HF PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for a `LlamaForCausalLM` base:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]`, `lora_B.weight`
`[out, r]`, and for DoRA `lora_magnitude_vector` `[out]`. The project's kernels are `[in, out]`,
so A and B are transposed on the way in and out. The scale of each module follows PEFT's rules
(`lora_alpha / r`, or `/ sqrt(r)` with `use_rslora`; `rank_pattern` / `alpha_pattern` keys
matched against the module name as PEFT's `get_pattern_key` does). Layers a PEFT adapter leaves
untouched get zero adapters (exactly no change), and ranks that differ between layers are
zero-padded to the largest, which is also exact.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import ADAPTERS
from alpaca_jax.model.params import check_params
from alpaca_jax.peft.lora import check_adapters, has_adapters
from alpaca_jax.peft.targets import FROM_HF_MODULE, HF_MODULE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
# settings that change what the adapter computes and that this loader does not implement
_UNSUPPORTED = {
    "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
    "layer_replication": None, "modules_to_save": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "target_parameters": None,
}


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():  # PEFT's get_pattern_key: first key that matches
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: no {CONFIG_FILE}")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r} is not supported "
                         "(only LORA, with or without use_dora)")
    for key, neutral in _UNSUPPORTED.items():
        value = conf.get(key, neutral)
        if value not in (neutral, [], {}, None, False):
            raise ValueError(f"{path}: {key}={value!r} is not supported by this loader")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={conf['bias']!r} is not supported (LLaMA has no biases)")
    return conf


def load_peft(params: dict, cfg: ModelConfig, adapter_dir) -> dict:
    """`params` with the adapter in `adapter_dir` added (not merged). Every tensor in the file
    must map onto a linear layer of this model with matching shapes, or a ValueError names it."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    conf = _read_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        other = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        raise FileNotFoundError(f"{adapter_dir}: no {WEIGHTS_FILE}" + (
            f" (found {other}; re-save it with safe_serialization=True)" if other else ""))
    check_params(params, cfg)
    if has_adapters(params):
        raise ValueError("params already hold adapters; merge them before loading another")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights} cannot be read as safetensors: {e}") from None

    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{weights}: tensor {key!r} is not a LoRA/DoRA weight of a LLaMA "
                             "decoder linear layer; this loader cannot place it")
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3).split(".")[0]
        if layer >= cfg.num_layers:
            raise ValueError(f"{weights}: tensor {key!r} is for layer {layer}, but the model has "
                             f"{cfg.num_layers} layers")
        found.setdefault(FROM_HF_MODULE[module], {}).setdefault(layer, {})[kind] = value
    if not found:
        raise ValueError(f"{weights} holds no LoRA tensors")

    use_dora, rslora = bool(conf.get("use_dora", False)), bool(conf.get("use_rslora", False))
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    L = cfg.num_layers
    group = {}
    for name, per_layer in found.items():
        w = np.asarray(params["layers"][name])
        _, d_in, d_out = w.shape
        ranks = {}
        for i, t in sorted(per_layer.items()):
            where = f"{weights}: layer {i} {HF_MODULE[name]}"
            need = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set())
            if set(t) != need:
                raise ValueError(f"{where} has {sorted(t)}, expected {sorted(need)}"
                                 + (" (adapter_config says use_dora)" if use_dora else ""))
            a, b = t["lora_A"], t["lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out \
                    or a.shape[0] != b.shape[1]:
                raise ValueError(f"{where}: lora_A {a.shape} / lora_B {b.shape} do not fit the "
                                 f"model's [{d_out}, {d_in}] weight (expected [r, {d_in}] and "
                                 f"[{d_out}, r])")
            if use_dora and t["lora_magnitude_vector"].shape != (d_out,):
                raise ValueError(f"{where}: lora_magnitude_vector "
                                 f"{t['lora_magnitude_vector'].shape}, expected ({d_out},)")
            ranks[i] = a.shape[0]
        r_max = max(ranks.values())
        A = np.zeros((L, d_in, r_max), np.float32)
        B = np.zeros((L, r_max, d_out), np.float32)
        scale = np.zeros((L,), np.float32)
        for i, t in per_layer.items():
            r = ranks[i]
            A[i, :, :r], B[i, :r, :] = t["lora_A"].astype(np.float32).T, t["lora_B"].astype(
                np.float32).T
            module = f"model.layers.{i}.{HF_MODULE[name]}"
            r_conf = _pattern_value(rank_pattern, module, conf.get("r", r))
            if r_conf != r:
                raise ValueError(f"{weights}: layer {i} {HF_MODULE[name]} has rank {r} but "
                                 f"{CONFIG_FILE} says {r_conf}")
            alpha = _pattern_value(alpha_pattern, module, conf.get("lora_alpha", 8))
            scale[i] = alpha / math.sqrt(r) if rslora else alpha / r
        ad = {"a": jnp.asarray(A), "b": jnp.asarray(B), "scale": jnp.asarray(scale),
              "dropout": jnp.full((L,), float(conf.get("lora_dropout", 0.0)), jnp.float32)}
        if use_dora:
            # layers without an adapter keep their weight: m = its column norms, zero delta
            m = np.sqrt(np.sum(np.square(w.astype(np.float32)), axis=1))
            for i, t in per_layer.items():
                m[i] = t["lora_magnitude_vector"].astype(np.float32)
            ad["m"] = jnp.asarray(m)
        group[name] = ad
    out = {**params, "layers": {**params["layers"], ADAPTERS: group}}
    check_adapters(out, cfg)
    return out


def save_peft(params: dict, cfg: ModelConfig, adapter_dir, base_model_name_or_path=None) -> Path:
    """Write the tree's adapters as `peft.PeftModel.from_pretrained` loads them (onto the HF
    export of the same base model, `save_hf`). Files are written whole or not at all."""
    from safetensors.numpy import save_file

    check_params(params, cfg)
    if not has_adapters(params):
        raise ValueError("params hold no adapters to save (add_lora or load_peft first)")
    check_adapters(params, cfg)
    group = params["layers"][ADAPTERS]
    kinds = {"m" in ad for ad in group.values()}
    if len(kinds) > 1:
        raise ValueError("some targets are DoRA and some plain LoRA; PEFT's use_dora is global")
    use_dora = kinds.pop()
    drops = {float(x) for ad in group.values() for x in np.asarray(ad["dropout"])}
    if len(drops) > 1:
        raise ValueError(f"adapter dropout differs between modules ({sorted(drops)}); PEFT "
                         "has one lora_dropout")

    tensors, ranks, alphas = {}, {}, {}
    for name, ad in group.items():
        r = int(ad["a"].shape[-1])
        ranks[name] = r
        a, b, scale = np.asarray(ad["a"]), np.asarray(ad["b"]), np.asarray(ad["scale"])
        for i in range(cfg.num_layers):
            module = f"model.layers.{i}.{HF_MODULE[name]}"
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T, np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T, np.float32)
            if use_dora:
                tensors[f"{prefix}.lora_magnitude_vector"] = np.asarray(ad["m"][i], np.float32)
            # the scale is stored in float32: print alpha at float32 precision (5.0, not 4.9999999)
            alphas[module] = float(f"{float(scale[i]) * r:.7g}")
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
            None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": r_default, "lora_alpha": alpha_default, "lora_dropout": drops.pop(),
        "target_modules": sorted(HF_MODULE[n].split(".")[-1] for n in group),
        "rank_pattern": {HF_MODULE[n].split(".")[-1]: r for n, r in ranks.items()
                         if r != r_default},
        "alpha_pattern": {re.escape(mod): a for mod, a in alphas.items() if a != alpha_default},
        "use_dora": use_dora, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "inference_mode": True,
    }
    adapter_dir = Path(adapter_dir)
    try:
        adapter_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create adapter directory {adapter_dir}: {e}") from None
    tmp_w, tmp_c = adapter_dir / f".{WEIGHTS_FILE}.tmp", adapter_dir / f".{CONFIG_FILE}.tmp"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(conf, indent=2) + "\n")
        os.replace(tmp_w, adapter_dir / WEIGHTS_FILE)
        os.replace(tmp_c, adapter_dir / CONFIG_FILE)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)
    return adapter_dir
