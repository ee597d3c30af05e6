"""Healing objectives: next-token loss (`sft`), logit distillation from a frozen teacher (`kd`),
or a weighted mix (`kd+sft`).

Per target position t (the positions the SFT loss uses: token t+1 is in the loss mask and in
the same packed example as token t), with student logits s, teacher logits z and temperature tau:

    nll_t = -log softmax(s_t)[x_{t+1}]
    kd_t  = tau^2 * KL( softmax(z_t / tau) || softmax(s_t / tau) )      (forward KL, teacher first)
    kd:      loss = sum_t kd_t / n
    kd+sft:  loss = sum_t (w * kd_t + (1 - w) * nll_t) / n

summed over every loss position of every micro-batch and divided by their number n, as the SFT
loss is, so gradient accumulation stays exact and per-segment packing needs nothing extra (the
teacher sees the same segment ids and positions). **tau^2 scaling (Hinton et al. 2015)**: the
gradient of KL(tau) w.r.t. the logits shrinks as 1/tau^2; the factor keeps the KD term's
gradient scale independent of tau, so `w` means the same at every temperature. The torch
reference (`tests/test_distill.py`) is `F.kl_div(log_softmax(s/tau), log_softmax(z/tau),
log_target=True) * tau**2`, the usual implementation. At tau=1 the KD loss is the
cross-entropy against the teacher minus the teacher's entropy, so it reaches 0 at a perfect copy.

**Teacher placement.** The teacher's params are an argument of the one jitted train step (not
closed over, so they are not baked into the program as constants), frozen: its forward runs
outside `value_and_grad`, so neither gradients nor residuals are formed for it, and its logits
exist only inside the step. Its matmuls run in the student's compute dtype, and when that is
bfloat16 its weights are stored in bfloat16 too (the forward casts each weight to the compute
dtype anyway; storing them so halves the teacher's memory). A QAT student keeps a float teacher:
the teacher's transform is `adapted` (any adapters it holds, no quantizer).

**Memory: `chunk`.** The new cost is the vocabulary-wide pair: teacher logits `[B, T, V]` float32
beside the student's (and their log-softmaxes in the backward). `chunk=0` (the default)
materialises them whole; `chunk=C` runs both models only up to the final norm, then a scan over
the sequence in C positions at a time computes both heads, the losses and (rematerialised in
the backward) their gradients, so only `[B, C, V]` logits exist at once. At SmolLM2's training
shape (8 x 256 tokens, V = 49,152: 384 MiB per float32 logits tensor) XLA allocates 1,590 MiB
of temporaries for one micro-batch's KD gradient whole, 442 MiB with `chunk=64`
(`benchmarks/bench_kd_memory.py`). We default to the whole sequence: that fits easily on the
CPU and on a GPU, and chunking recomputes both heads in the backward (the head is a quarter of
SmolLM2's matmul FLOPs). Set `chunk` (e.g. 64) for large vocabularies or long rows, where the
pair would not fit. Both paths give the same loss and gradient as torch (tested).

The held-out loss the loop reports stays the NLL whatever the objective, so runs with different
objectives compare on one scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.transform import Transform
from alpaca_jax.model.forward import forward

OBJECTIVES = ("sft", "kd", "kd+sft")
STAGE_TEACHERS = ("load", "prune")   # `stage:<name>`: the model as that pipeline stage left it


@dataclass
class DistillConfig:
    """The healing objective (Hydra group `distill`)."""
    objective: str = "sft"           # sft | kd | kd+sft
    tau: float = 1.0                 # temperature of both distributions (KD term scaled by tau^2)
    weight: float = 0.5              # kd+sft: w * KD + (1 - w) * NLL
    # stage:load (the model before pruning: the default), stage:prune (after it), or any model
    # the library loads: a registered name, HF directory, .gguf file, hub id, or a finished
    # run's directory (its final model)
    teacher: str = "stage:load"
    chunk: int = 0                   # positions per loss chunk; 0: the whole sequence at once


def check_distill(dc: DistillConfig) -> None:
    """Bad objective settings fail here, before data or model are loaded."""
    if dc.objective not in OBJECTIVES:
        raise ValueError(f"distill.objective={dc.objective!r} is not one of "
                         f"{', '.join(OBJECTIVES)}")
    if dc.objective == "sft":
        return
    if not dc.tau > 0:
        raise ValueError(f"distill.tau must be > 0, got {dc.tau}")
    if dc.objective == "kd+sft" and not 0.0 <= dc.weight <= 1.0:
        raise ValueError(f"distill.weight must lie in [0, 1] (the KD share), got {dc.weight}")
    if dc.chunk < 0:
        raise ValueError(f"distill.chunk must be >= 0 (0: no chunking), got {dc.chunk}")
    if not dc.teacher or str(dc.teacher).lower() in ("none", "null"):
        raise ValueError(f"distill.objective={dc.objective} needs a teacher: set distill.teacher "
                         f"(stage:load, the model before pruning, is the default)")
    stage = teacher_stage(dc.teacher)
    if stage is not None and stage not in STAGE_TEACHERS:
        raise ValueError(f"distill.teacher={dc.teacher!r}: a stage teacher is one of "
                         f"{', '.join('stage:' + s for s in STAGE_TEACHERS)}")


def teacher_stage(spec: str) -> str | None:
    """`'prune'` for `stage:prune`; None for a model source."""
    return spec[len("stage:"):] if spec.startswith("stage:") else None


def load_teacher(spec: str, sharding=None, setting: str = "distill.teacher"):
    """`(params, cfg, tokenizer)` of a teacher given as a model source: a finished run's
    directory (its final model, rebuilt from its recipe) or anything `load_model` takes;
    placed with `sharding` as it is read (`io/layout.py`). `setting` names the option in
    errors (export's `float_reference` loads its reference model the same way)."""
    from pathlib import Path

    from alpaca_jax.io.registry import load_model
    from alpaca_jax.recipe.replay import load_run_model

    if (Path(spec).expanduser() / "results.json").is_file():
        params, cfg, tok, _ = load_run_model(Path(spec).expanduser(), sharding)
        return params, cfg, tok
    try:
        return load_model(spec, sharding=sharding)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{setting}={spec!r} cannot be loaded: {e}") from e


def check_teacher(name: str, tcfg: ModelConfig, ttok, cfg: ModelConfig, tok,
                  setting: str = "distill.teacher") -> None:
    """KD compares two distributions over one vocabulary: the teacher's logits must have the
    student's width and its token ids must mean the same strings."""
    who = "the student's" if setting == "distill.teacher" else "the model's"
    if tcfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"{setting}={name}: its vocabulary has {tcfg.vocab_size} tokens, "
                         f"{who} {cfg.vocab_size}; the comparison needs one vocabulary")
    if ttok is None or tok is None:
        return
    a, b = list(ttok.pieces), list(tok.pieces)
    if a != b:
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(f"{setting}={name}: its tokenizer differs from {who} "
                         f"(token id {diff}: {a[diff] if diff < len(a) else None!r} vs "
                         f"{b[diff] if diff < len(b) else None!r}); the comparison needs one "
                         f"tokenizer")


@dataclass(frozen=True)
class Objective:
    """The static part of a distillation objective (hashable: part of the compiled step)."""
    kind: str
    tau: float
    weight: float
    chunk: int
    teacher_cfg: ModelConfig
    teacher_materialize: Transform = adapted


@dataclass
class Teacher:
    """What `train` needs to distil: the frozen teacher params (a step argument), the objective,
    and the record that goes into the recipe and the checkpoints' fingerprint."""
    params: dict
    objective: Objective
    record: dict = field(default_factory=dict)


def make_teacher(dc: DistillConfig, params: dict, tcfg: ModelConfig, student_cfg: ModelConfig,
                 name: str | None = None) -> Teacher | None:
    """The `Teacher` of a `kd`/`kd+sft` objective (None for `sft`): its matmuls in the student's
    compute dtype, its float weights stored in it when that is narrower than float32."""
    check_distill(dc)
    if dc.objective == "sft":
        return None
    check_teacher(name or dc.teacher, tcfg, None, student_cfg, None)
    dtype = jnp.dtype(student_cfg.compute_dtype)
    tcfg = tcfg.replace(compute_dtype=student_cfg.compute_dtype)
    if dtype != jnp.float32:
        params = jax.tree_util.tree_map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    obj = Objective(dc.objective, float(dc.tau), float(dc.weight), int(dc.chunk), tcfg)
    record = {"objective": dc.objective, "tau": float(dc.tau),
              "weight": float(dc.weight) if dc.objective == "kd+sft" else None,
              "chunk": int(dc.chunk), "teacher": name or dc.teacher,
              "teacher_layers": tcfg.num_layers, "teacher_dtype": str(dtype)}
    return Teacher(params, obj, record)


@dataclass(frozen=True)
class _HeadOff(Transform):
    """`inner` everywhere but the LM head, which returns its input: `forward` then yields the
    final-normed hidden state `[B, T, D]` (upcast to float32 by `logits_of`, losslessly), so the
    chunked loss can apply the head a slice at a time."""
    inner: Transform

    def weight(self, tree, name):
        return self.inner.weight(tree, name)

    def linear(self, x, tree, name, *, rng=None):
        return x if name == "lm_head" else self.inner.linear(x, tree, name, rng=rng)

    def tied_head(self, h, params):
        return h


def _head(params, hn, cfg: ModelConfig, materialize: Transform):
    """The LM head on final-normed hidden states: float32 logits, as `logits_of` computes them."""
    hn = hn.astype(cfg.compute_dtype)
    out = (materialize.tied_head(hn, params) if cfg.tie_embeddings
           else materialize.linear(hn, params, "lm_head"))
    return out.astype(jnp.float32)


def head_once(params, cfg: ModelConfig, materialize: Transform):
    """`(params, transform)` for applying the LM head a chunk at a time: where `materialize`
    quantizes the head's weight (QAT), that weight is formed here once, so its quantizer (for a
    K-quant head, a host-side search) runs once and not per chunk, under a transform that no
    longer quantizes weights (it keeps the activation rounding); the straight-through gradient
    still reaches the stored weight. Otherwise unchanged."""
    import dataclasses

    from alpaca_jax.quant.qat import FakeQuant

    key = "embed" if cfg.tie_embeddings else "lm_head"
    if not (isinstance(materialize, FakeQuant) and materialize.weights and
            dict(materialize.formats).get(key) is not None):
        return params, materialize
    return ({**params, key: materialize.weight(params, key)},
            dataclasses.replace(materialize, weights=False))


def seq_chunks(x, size: int):
    """`[B, P, ...]` -> `[n, B, size, ...]` along the sequence, zero-padded at the end (padded
    positions must carry loss mask 0)."""
    B, P = x.shape[:2]
    n = -(-P // size)
    x = jnp.pad(x, [(0, 0), (0, n * size - P)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, n, size, *x.shape[2:]), 1, 0)


def token_losses(s_logits, t_logits, targets, tau: float):
    """(nll, kd) per position `[..]` from float32 logits `[.., V]`: the next-token NLL and
    tau^2 * KL(teacher || student) at temperature tau."""
    logp = jax.nn.log_softmax(s_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ls = logp if tau == 1.0 else jax.nn.log_softmax(s_logits / tau, axis=-1)
    lt = jax.nn.log_softmax(t_logits / tau, axis=-1)
    kd = (tau * tau) * jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    return nll, kd


def _inputs(batch):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    mask = batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1])
    return tokens, seg, mask


def teacher_outputs(teacher_params, batch, obj: Objective):
    """The teacher's side of a micro-batch, frozen: logits `[B, T, V]`, or with chunking the
    final-normed hidden state `[B, T, D]` (the head is applied per chunk)."""
    tokens, seg, _ = _inputs(batch)
    m = _HeadOff(obj.teacher_materialize) if obj.chunk else obj.teacher_materialize
    out, _ = forward(teacher_params, tokens, obj.teacher_cfg, positions=batch["positions"],
                     segment_ids=seg, materialize=m)
    return jax.lax.stop_gradient(out)


def _combine(nll, kd, mask, obj: Objective):
    per = kd if obj.kind == "kd" else obj.weight * kd + (1.0 - obj.weight) * nll
    return jnp.sum(per * mask), jnp.sum(nll * mask), jnp.sum(kd * mask)


def distill_sums(params, teacher_params, t_out, batch, cfg, obj: Objective,
                 materialize=adapted, rng=None):
    """(sum of the objective over loss positions, their number, {'nll': sum, 'kd': sum}).
    `t_out` is `teacher_outputs(teacher_params, batch, obj)`; `teacher_params` is used only by
    the chunked path (the teacher's head, per chunk)."""
    tokens, seg, mask = _inputs(batch)
    n = jnp.sum(mask)
    if not obj.chunk:
        logits, _ = forward(params, tokens, cfg, positions=batch["positions"], segment_ids=seg,
                            materialize=materialize, rng=rng)
        nll, kd = token_losses(logits[:, :-1], t_out[:, :-1], tokens[:, 1:], obj.tau)
        s, s_nll, s_kd = _combine(nll, kd, mask, obj)
        return s, n, {"nll": s_nll, "kd": s_kd}
    h_s, _ = forward(params, tokens, cfg, positions=batch["positions"], segment_ids=seg,
                     materialize=_HeadOff(materialize), rng=rng)
    chunks = functools.partial(seq_chunks, size=obj.chunk)
    tcfg, tmat = obj.teacher_cfg, obj.teacher_materialize

    hp, hmat = head_once(params, cfg, materialize)
    tp, tmat = head_once(teacher_params, tcfg, tmat)

    @jax.checkpoint   # the backward recomputes a chunk's logits instead of keeping them all
    def body(acc, xs):
        hs, ht, tgt, m = xs
        t_logits = jax.lax.stop_gradient(_head(tp, ht, tcfg, tmat))
        nll, kd = token_losses(_head(hp, hs, cfg, hmat), t_logits, tgt, obj.tau)
        return tuple(a + b for a, b in zip(acc, _combine(nll, kd, m, obj))), None

    zero = jnp.float32(0)
    (s, s_nll, s_kd), _ = jax.lax.scan(
        body, (zero, zero, zero),
        (chunks(h_s[:, :-1]), chunks(t_out[:, :-1]), chunks(tokens[:, 1:]), chunks(mask)))
    return s, n, {"nll": s_nll, "kd": s_kd}
