"""Our model as an lm-evaluation-harness (`lm_eval`) model: the evaluator papers report.

`AlpacaJaxLM` subclasses lm-eval's `TemplateLM`, so a request's text is encoded by lm-eval's own
code (`_encode_pair`: the target delimiter stays, the context's trailing whitespace moves into
the continuation); only the token-level scoring is ours. It wraps any `(params, cfg, tokenizer,
materialize)`: adapters, fake-quant, a pruned model. Registered as `alpaca_jax`:

    python -m alpaca_jax.eval run --model alpaca_jax --model_args source=smollm2-135m-instruct \
        --tasks offline_zeroshot --include_path alpaca_jax/eval/tasks --limit 100

(`python -m alpaca_jax.eval` is lm-eval's own CLI with this module imported, since lm-eval has no
plugin hook for models.) `run_dir=<finished finetune/prune run>` evaluates the run's rebuilt model,
with its fake-quant transform when it was quantized.

Requests are served as `HFLM` serves them, request by request: `loglikelihood` scores the same
tokens (the input left-truncated to `max_length + 1` tokens, as HFLM), `loglikelihood_rolling` uses
lm-eval's rolling windows, and `generate_until` decodes with the compiled loop of
`alpaca_jax.model.generate` and cuts at the `until` strings. Batches are length-sorted and padded
to a few bucket lengths, so the forward compiles once per bucket shape, not per request; inputs
that are identical (a shared context with one-token answers such as boolq's no/yes) are run once.
Length buckets are 32, 48, 64, 96, 128, ...; rows per batch a power of two up to `batch_size`.
"""
from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward
from alpaca_jax.parallel.cluster import to_host

log = logging.getLogger(__name__)

SUPPORTED_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice",
                          "generate_until")
_MIN_BUCKET = 32
_TOKENS_PER_BATCH = 8 * 512   # rows shrink for long buckets, so the [B, T, V] logits stay bounded
_GEN_KWARGS = {"do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks", "seed"}


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _score_rows(params, tokens_BxT, last_B, *, cfg, materialize):
    """Per row: log p(token t+1 | <= t) `[B, T-1]`, the argmax at each position `[B, T]`, and the
    whole log-distribution at position `last` `[B, V]` (requests sharing a row differ only in
    the last token they score)."""
    logits, _ = forward(params, tokens_BxT, cfg, materialize=materialize)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                # [B, T]
    lp = jnp.take_along_axis(logits[:, :-1], tokens_BxT[:, 1:, None], axis=-1)[..., 0] \
        - lse[:, :-1]
    last = jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0] \
        - jnp.take_along_axis(lse, last_B[:, None], axis=1)
    return lp, jnp.argmax(logits, axis=-1).astype(jnp.int32), last


def _bucket(n: int, cap: int) -> int:
    """The padded length of an n-token row: the next of 32, 48, 64, 96, 128, 192, ... (powers of
    two and their 1.5x: at most a third of a row is padding), at most cap."""
    p = max(_MIN_BUCKET, 1 << (n - 1).bit_length())
    return min(cap, p * 3 // 4 if p * 3 // 4 >= max(n, _MIN_BUCKET) else p)


def _rows(n: int) -> int:
    """Rows of a batch holding n inputs: the next power of two, so a short last batch (or a
    task with few distinct inputs) is not padded to the full batch size."""
    return 1 << (n - 1).bit_length()


def _parse_batch_size(batch_size) -> int:
    if batch_size is None:
        return 8
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        log.warning("batch_size=%s: alpaca_jax has no automatic batch size; using 8", batch_size)
        return 8
    try:
        bs = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={batch_size!r} is not an integer") from None
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    return bs


def _device(device):
    """A jax device for lm-eval's `device` argument ('cpu', 'cuda:1', 'gpu', 'tpu:0'), or None
    for jax's default. lm-eval's CLI passes 'cuda:0' unless told otherwise; like its `hf` model,
    a device that is not there falls back to the default, with a warning."""
    if device is None or device == "":
        return None
    name, _, index = str(device).partition(":")
    platform = {"cuda": "gpu", "mps": "METAL"}.get(name, name)
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        devices = []
    i = int(index) if index.isdigit() else 0
    if not 0 <= i < len(devices):
        log.warning("device=%s: jax has no such device here; using %s", device,
                    jax.devices()[0])
        return None
    return devices[i]


def _on_mesh(method):
    """Run a request method on the model's own mesh, when it was given one."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self._mesh is None:
            return method(self, *args, **kwargs)
        with jax.set_mesh(self._mesh):
            return method(self, *args, **kwargs)
    return wrapped


@register_model("alpaca_jax")
class AlpacaJaxLM(TemplateLM):
    """An lm-eval model over `(params, cfg, tokenizer, materialize)`, or built from `source=`
    (anything `alpaca_jax.load_model` takes) or `run_dir=` (a finished finetune/prune run)."""

    def __init__(self, source: str | None = None, run_dir: str | None = None, *, params=None,
                 cfg=None, tokenizer=None, materialize=adapted, batch_size=8, device=None,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 compute_dtype: str | None = None, max_batch_size=None, name: str | None = None,
                 mesh: str | None = None):
        """`mesh`: "DATAxFSDPxTENSOR" (e.g. `mesh=2x2x2`, -1 for the rest): the params are
        placed by the logical rules (`parallel/`) and every request runs on that mesh. Inside
        a pipeline run the pipeline's mesh is already current and params already placed."""
        super().__init__()
        given = [k for k, v in (("source", source), ("run_dir", run_dir),
                                ("params", params)) if v is not None]
        if len(given) != 1:
            raise ValueError("alpaca_jax model: give exactly one of source=, run_dir= or "
                             f"params= (with cfg= and tokenizer=); got {given or 'none'}")
        if source is not None:
            from alpaca_jax.io.registry import load_model

            params, cfg, tokenizer = load_model(source)
        elif run_dir is not None:
            from alpaca_jax.recipe.replay import replay

            st, _ = replay(run_dir)    # with the grid it was evaluated on, when quantized
            params, cfg, tokenizer, materialize = st.params, st.cfg, st.tok, st.transform
        elif cfg is None or tokenizer is None:
            raise ValueError("alpaca_jax model: params= needs cfg= and tokenizer= too")
        if compute_dtype:
            cfg = cfg.replace(compute_dtype=str(compute_dtype))
        from alpaca_jax.quant.qat import fixed

        params, materialize = fixed(params, materialize)   # a K-quant model rounded once
        self._device = _device(device)
        if self._device is not None:
            params = jax.device_put(params, self._device)
        self._mesh = None
        if mesh:
            from alpaca_jax.parallel import MeshCfg, make_mesh, param_shardings, place_tree
            try:
                sizes = [int(x) for x in str(mesh).lower().split("x")]
                if len(sizes) != 3:
                    raise ValueError
            except ValueError:
                raise ValueError(f"alpaca_jax model: mesh={mesh!r}; expected "
                                 "DATAxFSDPxTENSOR, e.g. 2x2x2 or -1x1x2") from None
            self._mesh = make_mesh(MeshCfg(*sizes))
            params = place_tree(params, param_shardings(params, self._mesh)[0])
        self.params, self.cfg, self.tokenizer, self.materialize = params, cfg, tokenizer, \
            materialize
        self.batch_size = _parse_batch_size(batch_size)
        self._max_length = int(max_length or cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._name = name or source or run_dir or "alpaca_jax"
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        # generation stops at the model's end-of-turn ids, as transformers' generate does
        self._eos_ids = tuple(sorted(set(cfg.eos_token_ids) | {tokenizer.eos_id}))

    # -- what TemplateLM and the evaluator ask ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # as HFLM: BOS conditions an empty context (and the rolling windows), else EOS
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self._name).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """As HFLM: the tokenizer's own BOS policy unless told otherwise, and none when the
        string already starts with the BOS text."""
        tok = self.tokenizer
        bos = tok.add_bos if add_special_tokens is None or add_special_tokens else False
        if bos and add_special_tokens is None and tok.bos_id is not None \
                and string.startswith(tok.pieces[tok.bos_id]):
            bos = False
        ids = tok.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        from alpaca_jax.model.params import count_params

        return {"model_source": str(self._name), "model_num_parameters": count_params(self.params),
                "model_dtype": self.cfg.compute_dtype, "model_blocks": self.cfg.num_layers,
                "transform": getattr(self.materialize, "__name__",
                                     type(self.materialize).__name__)}

    # -- loglikelihood ------------------------------------------------------------------------
    @_on_mesh
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log p, all greedy) per `((context, continuation), context_ids, cont_ids)`."""
        rows: dict[tuple, int] = {}         # the model input (tokens) -> row index
        owner = []                          # per request: (row, continuation ids)
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("a loglikelihood request with an empty continuation "
                                 f"(context {ctx[-5:]}...): nothing to score")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit "
                                 f"max_length={self.max_length}")
            inp = tuple((ctx + cont)[-(self.max_length + 1):][:-1])   # HFLM's left truncation
            owner.append((rows.setdefault(inp, len(rows)), cont))
        inputs = list(rows)
        scored = self._score_inputs(inputs, len(requests), disable_tqdm)
        res = []
        for (req_str, _, _), (r, cont) in zip(requests, owner):
            lp, am, last = scored[r]
            inp, n, k = inputs[r], len(inputs[r]), len(cont)
            # predictions n-k .. n-2 are of tokens inside the input; n-1 is of the last token
            logprob = float(lp[n - k:n - 1].astype(np.float64).sum() + last[cont[-1]])
            greedy = bool(np.array_equal(am[n - k:n - 1], inp[n - k + 1:n])
                          and int(last.argmax()) == cont[-1])
            res.append((logprob, greedy))
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, (logprob, greedy))
        return res

    def _score_inputs(self, inputs, n_requests, disable_tqdm):
        """`[(lp, argmax, last log-distribution)]` per input, longest first, batched by bucket."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out = [None] * len(inputs)
        bar = tqdm(total=len(inputs), disable=disable_tqdm,
                   desc=f"alpaca_jax loglikelihood ({n_requests} requests)")
        k = 0
        while k < len(order):
            T = _bucket(len(inputs[order[k]]), self.max_length)
            batch = order[k:k + max(1, min(self.batch_size, _TOKENS_PER_BATCH // T))]
            rows = _rows(len(batch))
            toks = np.full((rows, T), self.pad_id, np.int32)
            last = np.zeros(rows, np.int32)
            for j, i in enumerate(batch):
                toks[j, :len(inputs[i])] = inputs[i]
                last[j] = len(inputs[i]) - 1
            lp, am, lastp = to_host(_score_rows(
                self.params, jnp.asarray(toks), jnp.asarray(last), cfg=self.cfg,
                materialize=self.materialize))
            for j, i in enumerate(batch):
                out[i] = (lp[j], am[j], lastp[j])
            k += len(batch)
            bar.update(len(batch))
        bar.close()
        return out

    @_on_mesh
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over lm-eval's disjoint rolling windows of
        `max_length` tokens (the first conditioned on `prefix_token_id`), as HFLM."""
        windows, counts = [], []
        for (string,) in (self._text_args(req, 1) for req in requests):
            ws = [(None,) + lm_utils.make_disjoint_window(w) for w in
                  lm_utils.get_rolling_token_windows(
                      token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                      max_seq_len=self.max_length, context_len=1)]
            windows += ws
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        res, k = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[k:k + n])
            k += n
            res.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return res

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        for req in requests:
            self._text_args(req, 2)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @staticmethod
    def _text_args(req, n):
        """A request's arguments, refusing what this text-only model cannot serve (images,
        audio: lm-eval appends them as a further argument)."""
        args = req.args
        if len(args) != n:
            raise ValueError(f"task {req.task_name!r} sends {req.request_type} requests with "
                             f"{len(args)} arguments (multimodal inputs?); the alpaca_jax model "
                             f"serves text only: {n} arguments")
        return args

    # -- generation ---------------------------------------------------------------------------
    @_on_mesh
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations cut at the first `until` string
        or EOS, at most `max_gen_toks` tokens; requests with the same settings batch together."""
        from alpaca_jax.model.generate import _PROMPT_BUCKET, generate_ids

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            _, gk = self._text_args(req, 2)
            groups.setdefault(json.dumps(gk, sort_keys=True, default=str), []).append(i)
        res = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="alpaca_jax generate_until")
        for idx in groups.values():
            kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            unknown = sorted(set(kw) - _GEN_KWARGS)
            if unknown:
                raise ValueError(f"task {requests[idx[0]].task_name!r} asks generation settings "
                                 f"{unknown} the alpaca_jax model does not implement "
                                 f"(it has {sorted(_GEN_KWARGS)})")
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n_new = int(kw["max_gen_toks"])
            # room for the new tokens after the prompt, padded to generate's prompt bucket
            room = (self.max_length - n_new) // _PROMPT_BUCKET * _PROMPT_BUCKET
            if room < 1:
                raise ValueError(f"max_gen_toks={n_new} leaves no room for a prompt in "
                                 f"max_length={self.max_length}")
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room)
                       for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            rows = min(self.batch_size, len(order))
            for k in range(0, len(order), rows):
                batch = order[k:k + rows]
                ids = [prompts[i] for i in batch]
                ids += [ids[-1]] * (rows - len(ids))     # a full batch: one compilation
                outs = generate_ids(
                    self.params, self.cfg, ids, n_new, temperature=temperature,
                    top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0),
                    seed=int(kw.get("seed") or 0), eos_ids=self._eos_ids,
                    pad_id=self.pad_id, materialize=self.materialize)
                for i, out in zip(batch, outs):
                    text = postprocess_generated_text(self.tok_decode(out), until, None)
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return res
