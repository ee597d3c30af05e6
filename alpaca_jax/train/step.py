"""The loss and the one jitted train step (gradient accumulation inside, by `lax.scan`); a
distillation objective (`train/distill.py`) replaces the loss, with the teacher a step argument."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward, next_token_nll
from alpaca_jax.train.distill import (_head, _HeadOff, distill_sums, head_once, seq_chunks,
                                      teacher_outputs)
from alpaca_jax.train.split import combine


def loss_sums(params, batch, cfg, materialize=adapted, rng=None, chunk: int = 0):
    """(sum of NLL over loss tokens, number of loss tokens). Token t+1 is a target only when it
    is in the loss mask and in the same packed example as token t. `rng` turns on adapter
    dropout (training). A batch without `segment_ids` holds one example per row (causal
    attention alone, no segment mask).

    `chunk=C`: the head and the log-softmax run C positions at a time under a rematerialised
    scan, so the float32 logits `[B, T, V]` (and their gradient) never exist whole, only
    `[B, C, V]`; the backward recomputes each chunk's logits. For large vocabularies and long
    rows (a 128k vocabulary at 8 x 2,048 tokens is 8.6 GB of float32 logits); the same sums up
    to float rounding (`tests/test_train.py`)."""
    if chunk < 0:
        raise ValueError(f"loss chunk must be >= 0 (0: the whole sequence at once), got {chunk}")
    tokens, seg = batch["tokens"], batch.get("segment_ids")
    mask = batch["loss_mask"][:, 1:]
    if seg is not None:
        mask = mask * (seg[:, 1:] == seg[:, :-1])
    if not chunk:
        logits, _ = forward(params, tokens, cfg, positions=batch["positions"], segment_ids=seg,
                            materialize=materialize, rng=rng)
        nll = next_token_nll(logits, tokens)
        return jnp.sum(nll * mask), jnp.sum(mask)
    h, _ = forward(params, tokens, cfg, positions=batch["positions"], segment_ids=seg,
                   materialize=_HeadOff(materialize), rng=rng)

    hp, hmat = head_once(params, cfg, materialize)   # a quantized head formed once

    @jax.checkpoint   # the backward recomputes a chunk's logits instead of keeping them all
    def body(acc, xs):
        hs, tgt, m = xs
        logp = jax.nn.log_softmax(_head(hp, hs, cfg, hmat), axis=-1)
        return acc - jnp.sum(jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0] * m), None

    s, _ = jax.lax.scan(body, jnp.float32(0), (seq_chunks(h[:, :-1], chunk),
                                               seq_chunks(tokens[:, 1:], chunk),
                                               seq_chunks(mask, chunk)))
    return s, jnp.sum(mask)


def make_train_step(cfg, optimizer, materialize=adapted, seed: int = 0, objective=None,
                    shardings=None, loss_chunk: int = 0):
    """step(trainable, frozen, opt_state, batch, step_idx, teacher=None) with batch leaves
    `[accum, B, T]`; the update uses the mean loss over all loss tokens of all micro-batches
    (exact accumulation). A step whose loss or gradient is not finite changes nothing and
    reports `finite=False`. With a distillation `objective` (`train/distill.py: Objective`),
    `teacher` is the frozen teacher's params and the metrics add the mean `nll` and `kd` terms.

    Randomness (adapter dropout) is keyed by `fold_in(fold_in(key(seed), step_idx), micro)`: a
    pure function of the step, so a resumed run draws the same masks with no RNG state saved.

    `shardings`: (trainable's, optimizer state's) NamedShardings on a mesh; the updated state
    is constrained to them, so it stays where the logical rules put it. `loss_chunk`: the
    next-token loss C positions at a time (`loss_sums`); a distillation objective has its own
    `chunk`."""

    def micro_grads(trainable, frozen, mb, rng, teacher):
        if objective is None:
            def f(t):
                s, n = loss_sums(combine(t, frozen), mb, cfg, materialize, rng=rng,
                                 chunk=loss_chunk)
                return s, (n, {})
        else:   # the teacher's forward stays outside the differentiated function
            t_out = teacher_outputs(teacher, mb, objective)

            def f(t):
                s, n, parts = distill_sums(combine(t, frozen), teacher, t_out, mb, cfg,
                                           objective, materialize, rng=rng)
                return s, (n, parts)
        (s, (n, parts)), g = jax.value_and_grad(f, has_aux=True)(trainable)
        return s, n, parts, g

    def step(trainable, frozen, opt_state, batch, step_idx, teacher=None):
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), step_idx)

        def body(carry, xs):
            mb, micro = xs
            s_acc, n_acc, p_acc, g_acc = carry
            s, n, parts, g = micro_grads(trainable, frozen, mb,
                                         jax.random.fold_in(step_key, micro), teacher)
            return (s_acc + s, n_acc + n, jax.tree_util.tree_map(jnp.add, p_acc, parts),
                    jax.tree_util.tree_map(jnp.add, g_acc, g)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        parts0 = {} if objective is None else {"nll": jnp.float32(0), "kd": jnp.float32(0)}
        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]
        (s, n, parts, g), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), parts0, zeros),
                                           (batch, jnp.arange(accum)))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree_util.tree_map(lambda x: x / n, g)
        loss, gnorm = s / n, optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = {"loss": loss, "grad_norm": gnorm, "tokens": n, "finite": finite,
                   **{k: v / n for k, v in parts.items()}}
        new_trainable, new_opt = keep(new_trainable, trainable), keep(new_opt, opt_state)
        if shardings is not None:
            new_trainable = jax.lax.with_sharding_constraint(new_trainable, shardings[0])
            new_opt = jax.lax.with_sharding_constraint(new_opt, shardings[1])
        return new_trainable, new_opt, metrics

    return jax.jit(step, donate_argnums=(0, 2))


def make_eval_fn(cfg, materialize=adapted, chunk: int = 0):
    @jax.jit
    def eval_sums(params, batch):
        return loss_sums(params, batch, cfg, materialize, chunk=chunk)
    return eval_sums
