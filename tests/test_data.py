"""Instruction data: templates, response-only loss, cutoff accounting, packing, batch order."""
import json
from pathlib import Path

import numpy as np
import pytest

from alpaca_jax.data.alpaca import (PROMPT_NO_INPUT, encode_records, format_prompt,
                                    load_records, split_records)
from alpaca_jax.data.batching import batch_indices, pack
from alpaca_jax.data.synthetic import exact_match, generate_tasks
from alpaca_jax.tokenizer.bpe import GPT2_SPLIT, ByteLevelBPETokenizer, bytes_to_unicode


@pytest.fixture(scope="module")
def tok():
    pieces = ["<pad>", "<s>", "</s>"] + [bytes_to_unicode()[b] for b in range(256)]
    return ByteLevelBPETokenizer(pieces, [], [GPT2_SPLIT], special_ids=[0, 1, 2], bos_id=1,
                                 eos_id=2, pad_id=0, add_bos=True)


def test_stanford_templates():
    assert format_prompt({"instruction": "Say hi.", "input": ""}) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_prompt({"instruction": "Add.", "input": "1 + 2"}).endswith(
        "### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n")
    assert "paired with an input" in format_prompt({"instruction": "a", "input": "b"})
    assert PROMPT_NO_INPUT.count("{") == 1


def test_loss_mask_covers_exactly_the_response_and_eos(tok):
    recs = [{"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
            {"instruction": "Say hi.", "input": "", "output": "hi there"}]
    enc = encode_records(tok, recs, cutoff_len=512)
    for ids, mask, r in zip(enc.ids, enc.loss_mask, recs):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1.0
        assert tok.decode(ids[mask == 1][:-1]) == r["output"]
        assert tok.decode(ids[mask == 0]) == format_prompt(r)
        first = int(np.argmax(mask))
        assert mask[first:].all() and not mask[:first].any()


def test_cutoff_truncation_is_counted_and_empty_examples_listed(tok):
    long = {"instruction": "x", "input": "", "output": "y" * 500}
    huge_prompt = {"instruction": "z" * 500, "input": "", "output": "ok"}
    enc = encode_records(tok, [long, huge_prompt], cutoff_len=200)
    assert enc.n_truncated == 2 and enc.dropped == [1] and len(enc) == 1
    assert enc.ids[0].size == 200 and enc.ids[0][-1] != tok.eos_id


def test_malformed_records_name_file_and_index(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match=r"data\.json: record 1 has no string field 'output'"):
        load_records(str(f))
    g = tmp_path / "data.jsonl"
    g.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2 is not valid JSON"):
        load_records(str(g))
    g.write_text('{"instruction": "a", "output": "b", "input": 3}\n')
    with pytest.raises(ValueError, match="record 0 field 'input'"):
        load_records(str(g))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(str(tmp_path / "missing.json"))


def test_real_alpaca_small_loads():
    recs = load_records(str(Path(__file__).resolve().parents[1]
                            / "data/alpaca/alpaca_small.json"))
    assert len(recs) == 2000 and all(set(r) == {"instruction", "input", "output"} for r in recs)
    train, val = split_records(recs, 100, seed=0)
    assert len(train) == 1900 and len(val) == 100
    assert split_records(recs, 100, seed=0)[1] == val != split_records(recs, 100, seed=1)[1]


def test_packing_segments_positions_and_masks():
    ids = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 27)]
    masks = [np.array([0, 0, 1, 1, 1.0]), np.array([0, 1, 1.0]), np.ones(7)]
    rows = pack([x.astype(np.int32) for x in ids], [m.astype(np.float32) for m in masks], 10)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows.segment_ids[0], [1] * 5 + [2] * 3 + [0, 0])
    np.testing.assert_array_equal(rows.positions[0, :8], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(rows.tokens[1, :7], np.arange(20, 27))
    assert rows.loss_mask.sum() == sum(m.sum() for m in masks)
    unpacked = pack([x.astype(np.int32) for x in ids], masks, 10, packing=False)
    assert len(unpacked) == 3
    with pytest.raises(ValueError, match="example 0 has 5 tokens > seq_len=4"):
        pack([ids[0]], [masks[0]], 4)


def test_batch_order_is_a_pure_function_of_step():
    seen = np.concatenate([batch_indices(10, 4, s, seed=3) for s in range(5)])  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    np.testing.assert_array_equal(batch_indices(10, 4, 2, seed=3), seen[8:12])  # straddles
    assert not np.array_equal(batch_indices(10, 4, 0, seed=4), seen[:4])


def test_synthetic_tasks_and_exact_match():
    tasks = generate_tasks(50, seed=1)
    assert tasks == generate_tasks(50, seed=1)
    for t in tasks:
        if t["instruction"] == "Add the two numbers.":
            a, b = map(int, t["input"].split(" + "))
            assert int(t["output"]) == a + b
    preds = [t["output"] for t in tasks[:10]]
    preds[3] = "wrong"
    preds[4] = "  " + preds[4] + ".\n"
    assert exact_match(preds, tasks[:10]) == 0.9


def test_pretokenized_npy_ids(tmp_path):
    from alpaca_jax.data.corpora import load_token_ids

    good = tmp_path / "ids.npy"
    np.save(good, np.arange(12, dtype=np.int64).reshape(3, 4))
    ids = load_token_ids(good, vocab_size=12)
    assert ids.shape == (3, 4) and ids.dtype == np.int32
    with pytest.raises(ValueError, match=r"ids\.npy: token ids span \[0, 11\].*\[0, 10\)"):
        load_token_ids(good, vocab_size=10)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.arange(5))
    with pytest.raises(ValueError, match=r"flat\.npy: expected an \[N, T\] integer array"):
        load_token_ids(flat)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"junk\.npy: not a readable"):
        load_token_ids(junk)
