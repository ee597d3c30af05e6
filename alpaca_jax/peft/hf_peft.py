"""Adapters in HF PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for a `LlamaForCausalLM` base:
`base_model.model.model.layers.{i}.self_attn.q_proj.<kind>`, where each registered PEFT method
(`peft/methods/`) names its kinds and converts one layer's tensors (`to_hf`, `from_hf`): LoRA's
`lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` (transposes of our `[in, out]`
factors), DoRA's `lora_magnitude_vector` `[out]` besides. Which method a file holds is read from
adapter_config.json (`peft_type`, and the method's `hf_config` entries such as `use_dora`).
The scale of each module follows PEFT's rules
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
from alpaca_jax.model.params import ADAPTERS, check_params
from alpaca_jax.peft.lora import check_adapters, has_adapters
from alpaca_jax.peft.methods import PEFT_METHODS, PeftMethod, method_of
from alpaca_jax.peft.targets import FROM_HF_MODULE, HF_MODULE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _key_pattern(method: PeftMethod) -> re.Pattern:
    """A tensor name of `method` on a decoder linear layer: (layer, module, kind)."""
    kinds = "|".join(re.escape(k) for k in method.hf_tensors)
    return re.compile(
        r"^(?:base_model\.model\.)?model\.layers\.(\d+)\."
        r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\."
        rf"({kinds})(?:\.weight)?$")


def _method_of_config(conf: dict, path: Path) -> PeftMethod:
    hits = [m for m in PEFT_METHODS.values() if m.matches_hf_config(conf)]
    if len(hits) != 1:
        described = "; ".join(
            f"{m.name}: peft_type {m.hf_peft_type}"
            + "".join(f", {k}={v}" for k, v in m.hf_config.items())
            for m in PEFT_METHODS.values())
        what = "matches no" if not hits else f"matches several ({[m.name for m in hits]})"
        raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r} with this config "
                         f"{what} registered PEFT method ({described})")
    return hits[0]
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
    _method_of_config(conf, path)
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
    method = _method_of_config(conf, adapter_dir / CONFIG_FILE)
    key_re = _key_pattern(method)
    check_params(params, cfg)
    if has_adapters(params):
        raise ValueError("params already hold adapters; merge them before loading another")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights} cannot be read as safetensors: {e}") from None

    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = key_re.match(key)
        if m is None:
            raise ValueError(f"{weights}: tensor {key!r} is not a {method.name} weight "
                             f"({', '.join(method.hf_tensors)}) of a LLaMA decoder linear "
                             "layer; this loader cannot place it")
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            raise ValueError(f"{weights}: tensor {key!r} is for layer {layer}, but the model has "
                             f"{cfg.num_layers} layers")
        found.setdefault(FROM_HF_MODULE[module], {}).setdefault(layer, {})[kind] = value
    if not found:
        raise ValueError(f"{weights} holds no LoRA tensors")

    rslora = bool(conf.get("use_rslora", False))
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    L = cfg.num_layers
    group = {}
    for name, per_layer in found.items():
        w = np.asarray(params["layers"][name])
        _, d_in, d_out = w.shape
        ranks, leaves = {}, {}
        need = set(method.hf_tensors)
        for i, t in sorted(per_layer.items()):
            where = f"{weights}: layer {i} {HF_MODULE[name]}"
            if set(t) != need:
                raise ValueError(f"{where} has {sorted(t)}, expected {sorted(need)} "
                                 f"({CONFIG_FILE} describes a {method.name} adapter)")
            leaves[i] = method.from_hf(t, d_in, d_out, where)
            ranks[i] = method.rank(leaves[i])
        r_max = max(ranks.values())
        # layers the file leaves out keep their weight: the method's neutral leaves; ranks
        # below r_max are zero-padded (each layer's leaves fill the leading corner)
        stacked = method.neutral(w, r_max)
        scale = np.zeros((L,), np.float32)
        for i in per_layer:
            r = ranks[i]
            for leaf, x in leaves[i].items():
                stacked[leaf][i][tuple(slice(0, n) for n in x.shape)] = x
            module = f"model.layers.{i}.{HF_MODULE[name]}"
            r_conf = _pattern_value(rank_pattern, module, conf.get("r", r))
            if r_conf != r:
                raise ValueError(f"{weights}: layer {i} {HF_MODULE[name]} has rank {r} but "
                                 f"{CONFIG_FILE} says {r_conf}")
            alpha = _pattern_value(alpha_pattern, module, conf.get("lora_alpha", 8))
            scale[i] = alpha / math.sqrt(r) if rslora else alpha / r
        group[name] = {**{k: jnp.asarray(v) for k, v in stacked.items()},
                       "scale": jnp.asarray(scale),
                       "dropout": jnp.full((L,), float(conf.get("lora_dropout", 0.0)),
                                           jnp.float32)}
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
    methods = {name: method_of(ad) for name, ad in group.items()}
    if len(set(methods.values())) > 1:
        raise ValueError("the targets use different PEFT methods "
                         f"({ {HF_MODULE[n]: m.name for n, m in methods.items()} }); a PEFT "
                         f"{CONFIG_FILE} has one method for every module")
    method = next(iter(methods.values()))
    drops = {float(x) for ad in group.values() for x in np.asarray(ad["dropout"])}
    if len(drops) > 1:
        raise ValueError(f"adapter dropout differs between modules ({sorted(drops)}); PEFT "
                         "has one lora_dropout")

    tensors, ranks, alphas = {}, {}, {}
    for name, ad in group.items():
        r = method.rank(ad)
        ranks[name] = r
        scale = np.asarray(ad["scale"])
        host = {k: np.asarray(ad[k]) for k in method.trainable}
        for i in range(cfg.num_layers):
            module = f"model.layers.{i}.{HF_MODULE[name]}"
            prefix = f"base_model.model.{module}"
            for kind, x in method.to_hf({k: v[i] for k, v in host.items()}).items():
                tensors[f"{prefix}.{method.hf_tensors[kind]}"] = x
            # the scale is stored in float32: print alpha at float32 precision (5.0, not 4.9999999)
            alphas[module] = float(f"{float(scale[i]) * r:.7g}")
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    conf = {
        "peft_type": method.hf_peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path":
            None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": r_default, "lora_alpha": alpha_default, "lora_dropout": drops.pop(),
        "target_modules": sorted(HF_MODULE[n].split(".")[-1] for n in group),
        "rank_pattern": {HF_MODULE[n].split(".")[-1]: r for n, r in ranks.items()
                         if r != r_default},
        "alpha_pattern": {re.escape(mod): a for mod, a in alphas.items() if a != alpha_default},
        **method.hf_config, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
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
