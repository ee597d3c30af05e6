"""Which weights an adapter targets: short names (q, k, v, o, gate, up, down), the project's
kernel names (wq, ..., w_down) and HF module names (q_proj, ..., down_proj) all resolve to the
same seven per-layer kernels. Patterns are shell-style globs (`*_proj`), or `all` / `all-linear`
(every linear layer in a block, as PEFT's "all-linear", which also leaves `lm_head` alone)."""
from __future__ import annotations

import fnmatch
from typing import Iterable

# project kernel -> (short name, HF module path inside a decoder layer)
KERNELS = {
    "wq": ("q", "self_attn.q_proj"),
    "wk": ("k", "self_attn.k_proj"),
    "wv": ("v", "self_attn.v_proj"),
    "wo": ("o", "self_attn.o_proj"),
    "w_gate": ("gate", "mlp.gate_proj"),
    "w_up": ("up", "mlp.up_proj"),
    "w_down": ("down", "mlp.down_proj"),
}
HF_MODULE = {k: path for k, (_, path) in KERNELS.items()}
FROM_HF_MODULE = {path: k for k, path in HF_MODULE.items()}
ALL = ("all", "all-linear")


def _names(kernel: str) -> tuple[str, ...]:
    short, path = KERNELS[kernel]
    return kernel, short, path.split(".")[-1], path


def resolve_targets(patterns: str | Iterable[str]) -> list[str]:
    """The kernels (in block order) matched by `patterns`; a pattern that matches nothing is an
    error naming it and the valid names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("adapter targets are empty; give at least one of "
                         f"{[s for s, _ in KERNELS.values()]} (or 'all')")
    chosen = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise ValueError(f"adapter target {pat!r} is not a string")
        if pat in ALL:
            chosen.update(KERNELS)
            continue
        hits = {k for k in KERNELS if any(fnmatch.fnmatchcase(n, pat) for n in _names(k))}
        if not hits:
            valid = ", ".join(f"{s} ({k}, {p.split('.')[-1]})" for k, (s, p) in KERNELS.items())
            raise ValueError(f"adapter target pattern {pat!r} matches no linear layer; "
                             f"valid names: {valid}, or 'all'")
        chosen |= hits
    return [k for k in KERNELS if k in chosen]
