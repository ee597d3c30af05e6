"""The fake quantizer of a run's `quant` settings, or of the record a finished run wrote: one
construction, so training, evaluation, export and replay see the same grid."""
from __future__ import annotations


def quantizer(qc, cfg):
    """The FakeQuant of the `quant` group (format, embed, head, activations) for this model;
    a tensor the format cannot take fails here, before any compute."""
    from alpaca_jax.quant import FakeQuant, QuantSpec

    return FakeQuant.from_spec(QuantSpec(qc.format, qc.embed, qc.head, qc.activations), cfg)


def quantizer_of_record(q: dict, cfg):
    """The FakeQuant a finished run was evaluated with, from its `recipe.quant` record."""
    from alpaca_jax.quant import FakeQuant, QuantSpec

    spec = QuantSpec(q["format"], q.get("embed", "auto"), q.get("head", "auto"),
                     bool(q.get("activations", False)))
    return FakeQuant.from_spec(spec, cfg)
