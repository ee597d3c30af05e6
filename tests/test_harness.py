"""The lm-eval model on a tiny random model against lm-eval's own `hf` model on its `save_hf`
export: the same requests (built by lm-eval from the offline task YAMLs), the same token ids,
log-likelihoods within 1e-4, greedy flags, generations, and the same task metrics; the offline
tasks' prompts; bad task names, files and records."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alpaca_jax import load_gguf
from alpaca_jax.eval.foundry import TaskDataError, read_records
from alpaca_jax.eval.lm_tasks import (OFFLINE, TASK_DIR, TaskError, resolve_tasks, run_tasks,
                                      task_manager)
from alpaca_jax.paths import REPO_ROOT
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from harness_reference import (compare_loglikelihood, generate_request, ll_request, pair,
                               rolling_request, task_requests)
from hf_reference import tiny_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    hf = tiny_hf_model(seed=5, vocab=len(tiny_bpe_vocab()[0]), max_pos=512)
    write_tiny_gguf(hf, d / "tiny.gguf")
    params, cfg, tok = load_gguf(d / "tiny.gguf")
    ours, ref = pair(params, cfg, tok, d / "hf", batch_size=4)
    return ours, ref, hf, tok


@pytest.fixture(scope="module")
def requests():
    return task_requests(limit=3)


def test_loglikelihood_requests_match_hf_request_by_request(models, requests):
    """Multiple choice (piqa, arc_easy, boolq, copa), schema (wsc273) and greedy (lambada): the
    boolq passages exceed the tiny model's 512 positions, so left truncation is compared too."""
    ours, ref, _, _ = models
    for name in OFFLINE:
        compare_loglikelihood(ours, ref, requests[name])
    assert max(len(ours.tok_encode(r.args[0])) for r in requests["offline_boolq"]) > 512


def test_greedy_flags_agree_where_the_continuation_is_greedy(models):
    """A request whose continuation is the model's own greedy next token is greedy in both."""
    ours, ref, hf, tok = models
    reqs = []
    for context in ("one two three four", "a b c", "the end of the", "x y z"):
        c = tok.encode(context)
        with torch.no_grad():
            g = int(hf(torch.tensor([c])).logits[0, -1].argmax())
        text = tok.decode([g])
        if tok.encode(context + text) == c + [g]:    # it tokenizes back to the same token
            reqs.append(ll_request(context, text))
    reqs.append(ll_request("one two", " zzz qqq"))
    _, greedy = compare_loglikelihood(ours, ref, reqs)
    assert True in greedy and greedy[-1] is False


def test_rolling_loglikelihood_matches_hf_across_windows(models):
    ours, ref, _, _ = models
    ours._max_length = 64            # several rolling windows per document
    ref._max_length = 64
    # lm-eval 0.4.13's one-token-continuation cache (HFLM logits_cache) scores the repetitive
    # document's batched windows wrongly (-1445.36 where each window scored alone, by HFLM or
    # by plain torch, sums to -1472.26); the reference runs without it
    ref.logits_cache = False
    try:
        docs = ["the hello tell " * 30, "short text", "x" * 150]
        reqs = [rolling_request(d) for d in docs]
        got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
        exp = ref.loglikelihood_rolling(reqs, disable_tqdm=True)
    finally:
        ours._max_length = ref._max_length = 512
        ref.logits_cache = True
    np.testing.assert_allclose(got, exp, atol=1e-4, rtol=0)
    assert len(ours.tok_encode(docs[0])) > 3 * 64


def test_generate_until_equals_hf_greedy(models):
    ours, ref, _, _ = models
    reqs = [generate_request("the hello", until=["ll"], max_gen_toks=12, do_sample=False),
            generate_request("one two three", until=["\n\n"], max_gen_toks=12, do_sample=False),
            generate_request("x", until=["e"], max_gen_toks=6, do_sample=False)]
    got = ours.generate_until(reqs, disable_tqdm=True)
    assert got == ref.generate_until(reqs, disable_tqdm=True)
    assert all(isinstance(g, str) for g in got) and any(got)


def test_task_metrics_equal_hf(models):
    """lm_eval.simple_evaluate with either model: identical acc and acc_norm on every task."""
    ours, ref, _, _ = models
    resolved = resolve_tasks(list(OFFLINE))
    got, record = run_tasks(ours, resolved, limit=4, bootstrap_iters=0)
    exp, _ = run_tasks(ref, resolved, limit=4, bootstrap_iters=0)
    accs = {k: v for k, v in exp.items() if k.endswith(("/acc", "/acc_norm"))}
    assert len(accs) == 8 and {k: got[k] for k in accs} == accs
    assert got["lambada_openai/perplexity"] == pytest.approx(exp["lambada_openai/perplexity"],
                                                             rel=1e-4)
    assert record["lm_eval_version"].startswith("0.4") and record["limit"] == 4
    assert record["tasks"]["piqa"] == {"task": "offline_piqa", "version": 1.0, "n_shot": 0,
                                       "n": 4, "n_total": 1838,
                                       "output_type": "multiple_choice"}


def _official_requests(path: str, docs: list[dict]):
    """The requests lm-eval's own task YAML (lm_eval/tasks/<path>) builds for `docs`, given in
    that task's dataset schema (served locally in place of its Hub download)."""
    import datasets
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / path, resolve_func=True)
    ds = datasets.Dataset.from_list(docs)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: ds for s in ("train", "validation", "test")})
    task = next(iter(task_manager((), defaults=False).load([cfg])["tasks"].values()))
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [r.args for r in task.instances]


def _official_docs(name: str, n: int) -> list[dict]:
    """The first n vendored records in the schema of lm-eval's own task (the inverse of how
    llm-foundry wrote them)."""
    recs = read_records(REPO_ROOT / "data" / "zeroshot" / f"{name}.jsonl")[1][:n]
    if name == "piqa":      # query "Question: {goal}\n"
        return [{"goal": r["query"][10:-1], "sol1": r["choices"][0], "sol2": r["choices"][1],
                 "label": r["gold"]} for r in recs]
    if name == "arc_easy":  # query "Question: {question}"
        return [{"id": str(i), "question": r["query"][10:], "answerKey": "ABCDE"[r["gold"]],
                 "choices": {"text": r["choices"], "label": list("ABCDE"[:len(r["choices"])])}}
                for i, r in enumerate(recs)]
    if name == "boolq":     # query "Passage: {passage}\nQuestion: {question}?"
        return [dict(zip(("passage", "question"), r["query"][9:-1].rsplit("\nQuestion: ", 1)),
                     label=r["gold"], idx=0) for r in recs]
    if name == "copa":      # query "{premise without its period}, therefore|because"
        return [{"premise": r["query"].rsplit(", ", 1)[0] + ".", "choice1": r["choices"][0],
                 "choice2": r["choices"][1], "label": r["gold"], "idx": 0,
                 "question": {"therefore": "effect", "because": "cause"}[
                     r["query"].rsplit(", ", 1)[1]]} for r in recs]
    if name == "winograd_wsc":   # contexts "{text before the pronoun}{option}"
        out = []
        for r in recs:
            pre = os.path.commonprefix(r["context_options"])
            pre = pre[:pre.rfind(" ") + 1]
            out.append({"text": pre + "it " + r["continuation"], "pronoun": "it",
                        "pronoun_loc": len(pre), "quote": "it", "quote_loc": len(pre),
                        "options": [c[len(pre):] for c in r["context_options"]],
                        "label": r["gold"], "source": ""})
        return out
    return [{"text": r["context"] + " " + r["continuation"]} for r in recs]   # lambada


@pytest.mark.parametrize("ours, official, data", [
    ("offline_piqa", "piqa/piqa.yaml", "piqa"),
    ("offline_arc_easy", "arc/arc_easy.yaml", "arc_easy"),
    ("offline_boolq", "super_glue/boolq/default.yaml", "boolq"),
    ("offline_copa", "super_glue/copa/default.yaml", "copa"),
    ("offline_wsc273", "wsc273/default.yaml", "winograd_wsc"),
    ("offline_lambada_openai", "lambada/lambada_openai.yaml", "lambada_openai"),
])
def test_offline_tasks_build_the_official_tasks_requests(requests, ours, official, data):
    """Our YAML over the llm-foundry record and lm-eval's own YAML (its prompt functions
    included: copa's, wsc273's process_docs) over the same record in the official schema build
    the same requests, character for character."""
    got = [r.args for r in requests[ours]]
    assert got and got == _official_requests(official, _official_docs(data, 3))


def test_offline_prompts_read_as_lm_evals(requests):
    first = {n: [r.args for r in rs if r.doc_id == 0] for n, rs in requests.items()}
    assert first["offline_piqa"][0][0] == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:")
    assert first["offline_copa"][0] == ("The man turned on the faucet therefore",
                                        "  the toilet filled with water.")
    assert first["offline_lambada_openai"][0][1] == " signs"


def test_unknown_task_is_named_before_any_model(tmp_path):
    with pytest.raises(TaskError, match="Tasks not found: offline_piqq.*did you mean "
                                        "offline_piqa"):
        resolve_tasks(["offline_piqq"])


def test_the_paper_suite_resolves_to_lm_evals_tasks():
    """Shortened LLaMA's seven: lm-eval's own names, all served request types (not run: their
    data is on the Hub)."""
    from omegaconf import OmegaConf

    paper = OmegaConf.load(REPO_ROOT / "conf" / "eval" / "paper.yaml").tasks
    r = resolve_tasks(list(paper))
    assert sorted(r.output_types) == sorted(paper) and set(r.output_types.values()) == {
        "multiple_choice"}


def test_a_request_type_the_model_cannot_serve_is_refused(models, tmp_path):
    (tmp_path / "img.yaml").write_text(
        "task: img_task\ndataset_path: x\noutput_type: generate_until\ntest_split: test\n"
        "doc_to_text: q\ndoc_to_target: a\ndoc_to_image: [image]\n")
    with pytest.raises(TaskError, match="task 'img_task' sends doc_to_image inputs; the "
                                        "alpaca_jax model serves text only"):
        resolve_tasks(["img_task"], [str(tmp_path)])
    req = generate_request("q", until=["x"])
    req.arguments = ("q", {"until": ["x"]}, {"visual": []})
    with pytest.raises(ValueError, match="3 arguments .*serves text only"):
        models[0].generate_until([req])


def test_malformed_task_files_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: bad\n  output_type: [\n")
    with pytest.raises(TaskError, match=r"bad.yaml: not a valid lm-eval task file"):
        resolve_tasks(["offline_copa"], [str(tmp_path)])
    (tmp_path / "bad.yaml").unlink()
    data = tmp_path / "mc.jsonl"
    data.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n'
                    '{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    task = (TASK_DIR / "offline_copa.yaml").read_text().replace(
        "offline_copa", "my_copa").replace("data/zeroshot/copa.jsonl", str(data))
    (tmp_path / "my_copa.yaml").write_text(task)
    shutil.copy(TASK_DIR / "loader.py", tmp_path / "loader.py")
    with pytest.raises(TaskDataError, match=r"mc.jsonl:2: gold=2 is not an index"):
        resolve_tasks(["my_copa"], [str(tmp_path)])


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a"], "gold": 0}', "at least 2 strings"),
    ('{"query": "q", "gold": 0}', "match none of the llm-foundry formats"),
    ('{"context": "c", "continuation": ""}', "the continuation non-empty"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold=True is not an index"),
    ('{"context": "c", "continuation": "d"}', "a language_modeling record in a multiple_choice"),
    ("not json", "not valid JSON"),
])
def test_malformed_records_are_named_by_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    first = {"context": "c", "continuation": "d"} if "non-empty" in message else \
        {"query": "q", "choices": ["a", "b"], "gold": 0}
    p.write_text(json.dumps(first) + "\n" + line)
    with pytest.raises(TaskDataError, match=rf"bad.jsonl:2: .*{message}|bad.jsonl:2: {message}"):
        read_records(p)


def test_the_vendored_sets_parse_in_their_formats():
    expected = {"piqa": ("multiple_choice", 1838), "arc_easy": ("multiple_choice", 2376),
                "boolq": ("multiple_choice", 3270), "copa": ("multiple_choice", 100),
                "winograd_wsc": ("schema", 273), "lambada_openai": ("language_modeling", 5153)}
    for name, (fmt, n) in expected.items():
        got_fmt, records = read_records(REPO_ROOT / "data" / "zeroshot" / f"{name}.jsonl")
        assert (got_fmt, len(records)) == (fmt, n), name
