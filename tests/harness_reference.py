"""lm-eval's own `hf` model on a `save_hf` export: the reference our harness model is compared
with, request by request, on the requests lm-eval's tasks build."""
from __future__ import annotations

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from alpaca_jax import save_hf
from alpaca_jax.eval.harness import AlpacaJaxLM
from alpaca_jax.eval.lm_tasks import OFFLINE, resolve_tasks


def pair(params, cfg, tok, export_dir, *, batch_size=4, max_length=None):
    """(ours, lm-eval's HFLM) over the same weights, both float32 on the CPU."""
    save_hf(params, cfg, tok, export_dir)
    ours = AlpacaJaxLM(params=params, cfg=cfg, tokenizer=tok, batch_size=batch_size,
                       max_length=max_length)
    hf = HFLM(pretrained=str(export_dir), device="cpu", dtype="float32", batch_size=batch_size,
              max_length=max_length)
    return ours, hf


def task_requests(limit: int, names=OFFLINE) -> dict[str, list[Instance]]:
    """The requests lm-eval builds for the first `limit` documents of each offline task."""
    tm = resolve_tasks(list(names)).manager
    out = {}
    for name, task in tm.load(list(names))["tasks"].items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out[name] = list(task.instances)
    return out


def compare_loglikelihood(ours, hf, requests, atol=1e-4, per_token=False):
    """Same token ids per request, log-likelihoods within `atol` (`per_token`: atol per scored
    token, for sums over long continuations), the same greedy flags. Returns the largest
    difference and the greedy flags."""
    args = [r.args for r in requests]
    n_cont = []
    for c, k in args:
        a, b = ours._encode_pair(c, k), hf._encode_pair(c, k)
        assert a == b, f"token ids differ for {c[-40:]!r} + {k!r}: {a} vs {b}"
        n_cont.append(len(a[1]))
    got, ref = ours.loglikelihood(requests, disable_tqdm=True), \
        hf.loglikelihood(requests, disable_tqdm=True)
    lp, lp_ref = np.array([g[0] for g in got]), np.array([r[0] for r in ref])
    tol = atol * np.array(n_cont) if per_token else atol
    assert np.all(np.abs(lp - lp_ref) <= tol), (np.abs(lp - lp_ref), n_cont)
    assert [g[1] for g in got] == [r[1] for r in ref]
    return float(np.max(np.abs(lp - lp_ref))), [g[1] for g in got]


def ll_request(context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0, ("ll", 0, 1))


def rolling_request(text: str) -> Instance:
    return Instance("loglikelihood_rolling", {}, (text,), 0, ("rolling", 0, 1))


def generate_request(prompt: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (prompt, gen_kwargs), 0, ("gen", 0, 1))
