"""The instruction data of a run (group `data`): Alpaca records from a file, the hub or the
synthetic generator, split, encoded with the loss on the response only, and packed. Read before
the model loads, so a malformed record fails first."""
from __future__ import annotations

from alpaca_jax.paths import resolve_path


def load_instruction_records(data):
    from alpaca_jax.data.alpaca import load_records
    from alpaca_jax.data.synthetic import generate_tasks

    if data.source == "synthetic":
        records = generate_tasks(data.synthetic_size, seed=data.split_seed)
    else:
        records = load_records(resolve_path(data.source))
    return records[: data.max_records] if data.max_records else records


def pack_instruction_data(d, tok, train_rec, val_rec):
    """(train rows, val rows or None, stats): records encoded with the loss on the response
    only, truncated at `d.cutoff_len` (counted), packed into rows of `d.seq_len`."""
    from alpaca_jax.data.alpaca import encode_records
    from alpaca_jax.data.batching import pack

    enc_train = encode_records(tok, train_rec, d.cutoff_len)
    enc_val = encode_records(tok, val_rec, d.cutoff_len)
    if len(enc_train) == 0:
        raise ValueError(f"data.cutoff_len={d.cutoff_len}: no training example keeps a response "
                         f"token (all {len(enc_train.dropped)} prompts fill the cutoff)")
    pad = tok.pad_id if tok.pad_id is not None else 0
    train_rows = pack(enc_train.ids, enc_train.loss_mask, d.seq_len, pad, d.packing)
    val_rows = pack(enc_val.ids, enc_val.loss_mask, d.seq_len, pad, d.packing) if val_rec else None
    stats = {"records": len(train_rec) + len(val_rec), "train_examples": len(enc_train),
             "val_examples": len(enc_val), "train_rows": len(train_rows),
             "truncated": enc_train.n_truncated + enc_val.n_truncated,
             "dropped_no_response": len(enc_train.dropped) + len(enc_val.dropped),
             "train_loss_tokens": int(train_rows.loss_mask.sum())}
    print(f"data: {stats}", flush=True)
    return train_rows, val_rows, stats
