"""Zero-shot scoring against transformers log-probabilities on a tiny model, the three JSONL
formats, and the vendored sets' records."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alpaca_jax import load_gguf
from alpaca_jax.eval import zeroshot
from alpaca_jax.eval.zeroshot import read_tasks, score_continuations
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

VENDORED = Path(__file__).resolve().parent.parent / "data" / "zeroshot"

MC = [{"query": "Question: which is a colour?", "choices": ["red", "table", "a long answer"],
       "gold": 0},
      {"query": "The cat sat on the\n", "choices": ["mat.", "moon and the stars."], "gold": 1},
      {"query": "Pick one:", "choices": ["yes", "no"], "gold": 1}]
SCHEMA = [{"context_options": ["The ball broke the window because the ball",
                               "The ball broke the window because the window"],
           "continuation": "was fragile.", "gold": 1}]
LM = [{"context": "one two three four", "continuation": "five"}]   # a record of each format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    hf = tiny_hf_model(seed=3, vocab=len(tiny_bpe_vocab()[0]), max_pos=256)
    write_tiny_gguf(hf, path)
    params, cfg, tok = load_gguf(path)
    return hf, params, cfg, tok


def _write(tmp_path, name, records):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return p


def _torch_sum(hf, tok, context, continuation):
    """The reference: transformers' log-probabilities of the continuation's tokens."""
    c = tok.encode(context)
    k = tok.encode(continuation, bos=False, parse_special=False)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([c + k])).logits[0].double(), -1).numpy()
    return sum(logp[len(c) - 1 + j, t] for j, t in enumerate(k)), \
        all(logp[len(c) - 1 + j].argmax() == t for j, t in enumerate(k))


def test_multiple_choice_acc_and_acc_norm_match_transformers(tiny, tmp_path):
    hf, params, cfg, tok = tiny
    res = zeroshot(params, cfg, tok, _write(tmp_path, "mc.jsonl", MC), batch_size=2)
    acc, acc_norm = [], []
    for r in MC:
        # one space before a choice unless the query ends in whitespace (lm-eval's target
        # delimiter); acc_norm divides by the continuation's UTF-8 bytes
        conts = [c if r["query"][-1].isspace() else " " + c for c in r["choices"]]
        sums = np.array([_torch_sum(hf, tok, r["query"], c)[0] for c in conts])
        acc.append(sums.argmax() == r["gold"])
        acc_norm.append((sums / [len(c.encode()) for c in conts]).argmax() == r["gold"])
        ours, _ = score_continuations(params, cfg, tok, [(r["query"], c) for c in conts])
        np.testing.assert_allclose(ours, sums, rtol=1e-5)
    assert res == {"format": "multiple_choice", "n": 3, "acc": pytest.approx(np.mean(acc)),
                   "acc_norm": pytest.approx(np.mean(acc_norm)),
                   "acc_stderr": pytest.approx(np.sqrt(np.mean(acc) * (1 - np.mean(acc)) / 2))}


def test_schema_scores_the_continuation_under_each_context(tiny, tmp_path):
    hf, params, cfg, tok = tiny
    res = zeroshot(params, cfg, tok, _write(tmp_path, "s.jsonl", SCHEMA * 2))
    sums = [_torch_sum(hf, tok, c, " was fragile.")[0] for c in SCHEMA[0]["context_options"]]
    assert res["format"] == "schema" and res["n"] == 2 and "acc_norm" not in res
    assert res["acc"] == float(int(np.argmax(sums)) == 1)


def test_language_modelling_is_exact_greedy_match(tiny, tmp_path):
    hf, params, cfg, tok = tiny
    for context in ("one two three four ", "a b c ", "the end of the ", "x y z "):
        c = tok.encode(context)
        with torch.no_grad():   # the model's own greedy next token is correct by definition
            g = int(hf(torch.tensor([c])).logits[0, -1].argmax())
        if tok.encode(tok.decode([g]), bos=False, parse_special=False) == [g]:
            break               # its text encodes back to the same single token
    else:
        pytest.fail("no context whose greedy token survives a decode/encode round trip")
    records = [{"context": context, "continuation": tok.decode([g])},
               {"context": context, "continuation": "zzz qqq"}]     # several tokens, not greedy
    expected = [_torch_sum(hf, tok, context, r["continuation"])[1] for r in records]
    assert expected == [True, False]
    res = zeroshot(params, cfg, tok, _write(tmp_path, "lm.jsonl", records))
    assert res["format"] == "language_modeling" and res["acc"] == 0.5 and res["n"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold=2 is not an index"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "at least 2 strings"),
    ('{"query": "q", "gold": 0}', "match none of the zero-shot formats"),
    ('{"context": "c", "continuation": ""}', "the continuation non-empty"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold=True is not an index"),
    ("not json", "not valid JSON"),
])
def test_malformed_records_are_named_by_file_and_line(tmp_path, line, message):
    good = json.dumps(LM[0] if '"context"' in line else MC[0])
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}|bad.jsonl:2: {message}"):
        read_tasks(p)


def test_mixed_formats_and_missing_files_fail(tmp_path):
    p = _write(tmp_path, "mixed.jsonl", [MC[0], LM[0]])
    with pytest.raises(ValueError, match="mixed.jsonl:2: a language_modeling record in a "
                                         "multiple_choice file"):
        read_tasks(p)
    with pytest.raises(FileNotFoundError, match="no such zero-shot file"):
        read_tasks(tmp_path / "nope.jsonl")


def test_the_vendored_sets_parse_in_their_formats():
    expected = {"piqa": ("multiple_choice", 1838), "arc_easy": ("multiple_choice", 2376),
                "boolq": ("multiple_choice", 3270), "copa": ("multiple_choice", 100),
                "winograd_wsc": ("schema", 273), "lambada_openai": ("language_modeling", 5153)}
    for name, (fmt, n) in expected.items():
        got_fmt, records = read_tasks(VENDORED / f"{name}.jsonl")
        assert (got_fmt, len(records)) == (fmt, n), name
    assert len(read_tasks(VENDORED / "piqa.jsonl", limit=10)[1]) == 10
