"""Pruning criteria register themselves here, by name (issue 15).

A criterion used to be spread over five places (a name list, a branch in `block_scores`, a
protection table, an iterative special case, a "needs calibration" copy in the experiments), so
adding one meant finding them all and the copies drifted. Now each criterion is one `Criterion`
record, registered once next to its scoring code in `alpaca_jax/prune/criteria/<name>.py`, and
everything else (`block_scores`, `prune_plan`, `protection`, the settings checks in
`experiments/`) asks the registry:

    @register_criterion("bi", needs_calibration=True, summary="ShortGPT's block influence")
    def bi_scores(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray: ...  # [L]

    get_criterion("taylor_plus").keep_first     # 4 (aliases resolve)
    criterion_needs_calibration("magnitude")    # False
    criterion_names()                           # ('ppl', 'taylor', ..., 'angular')

Hooks and their signatures (`ids` is checked `[N, T]` calibration, or None when the criterion
needs none; `keep_first`/`keep_last` are the resolved protection):

- `score(params, cfg, ids, *, batch_size, seed, materialize) -> [L]` scores, lower = removed
  first. What `block_scores` returns.
- `plan(params, cfg, ids, n, keep_first, keep_last, *, batch_size, seed, materialize) -> dict`
  (optional): the one-shot choice as `{"scores", "order", "pruned", ...extras}`. Without it the
  choice is the n lowest `score`s outside the protected blocks. A criterion whose choice is not
  the n lowest per-block scores (angular: a contiguous run) sets `per_block=False` and a `plan`.
- `iterate(...)` (optional, same signature as `plan`): re-score after each removal; its
  presence is what `supports_iterative` means.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

# "none" is how the settings say "do not prune"; no criterion may take the name
RESERVED = ("none",)

_REGISTRY: dict[str, "Criterion"] = {}   # canonical name -> criterion, in registration order


@dataclasses.dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable
    needs_calibration: bool
    summary: str = ""
    aliases: tuple[str, ...] = ()
    keep_first: int = 0            # default protection: blocks never removed at the start ...
    keep_last: int = 0             # ... and at the end (explicit keep_first/keep_last win)
    plan: Callable | None = None
    iterate: Callable | None = None
    per_block: bool = True         # the choice is the n lowest scores (select_blocks applies)

    @property
    def supports_iterative(self) -> bool:
        return self.iterate is not None

    @property
    def protection(self) -> tuple[int, int]:
        return self.keep_first, self.keep_last


def register_criterion(name: str, *, needs_calibration: bool, summary: str = "",
                       aliases: tuple[str, ...] | list[str] = (), keep_first: int = 0,
                       keep_last: int = 0, plan: Callable | None = None,
                       iterate: Callable | None = None, per_block: bool = True):
    """Decorator on a criterion's score function: registers `Criterion(name, score=fn, ...)`
    and returns `fn` unchanged. A name or alias already taken raises."""
    aliases = tuple(aliases)

    def register(score: Callable) -> Callable:
        if not callable(score):
            raise TypeError(f"criterion {name!r}: score must be callable, got {score!r}")
        if not isinstance(needs_calibration, bool):
            raise TypeError(f"criterion {name!r}: needs_calibration must be a bool")
        for key, value in (("keep_first", keep_first), ("keep_last", keep_last)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"criterion {name!r}: {key} must be an int >= 0, got {value!r}")
        if not per_block and plan is None:
            raise ValueError(f"criterion {name!r}: per_block=False needs a plan hook to choose "
                             f"its blocks")
        taken = _names_taken()
        for key in (name, *aliases):
            if not key or not isinstance(key, str):
                raise ValueError(f"criterion names must be non-empty strings, got {key!r}")
            if key in RESERVED:
                raise ValueError(f"{key!r} is reserved (prune.criterion=none means no pruning)")
            if key in taken:
                raise ValueError(f"pruning criterion name {key!r} is already registered "
                                 f"(by {taken[key]!r})")
        _REGISTRY[name] = Criterion(name=name, score=score, needs_calibration=needs_calibration,
                                    summary=summary, aliases=aliases, keep_first=keep_first,
                                    keep_last=keep_last, plan=plan, iterate=iterate,
                                    per_block=per_block)
        return score

    return register


def _names_taken() -> dict[str, str]:
    taken = {}
    for c in _REGISTRY.values():
        for key in (c.name, *c.aliases):
            taken[key] = c.name
    return taken


def criterion_names() -> tuple[str, ...]:
    """The canonical names of every registered criterion, in registration order."""
    return tuple(_REGISTRY)


def registered_criteria() -> tuple[Criterion, ...]:
    return tuple(_REGISTRY.values())


def _known() -> str:
    return ", ".join(c.name + (f" ({', '.join(c.aliases)})" if c.aliases else "")
                     for c in _REGISTRY.values())


def get_criterion(name: str) -> Criterion:
    """The registered criterion called `name` or one of its aliases; an unknown name raises
    ValueError listing the registered names (aliases in parentheses)."""
    if isinstance(name, str):
        if name in _REGISTRY:
            return _REGISTRY[name]
        for c in _REGISTRY.values():
            if name in c.aliases:
                return c
    raise ValueError(f"unknown pruning criterion {name!r}; registered: {_known()}")


def canonical_criterion(name: str) -> str:
    return get_criterion(name).name


def criterion_needs_calibration(name: str) -> bool:
    """Whether `name` scores on calibration ids (False: magnitude, random)."""
    return get_criterion(name).needs_calibration


def iterative_criteria() -> tuple[str, ...]:
    return tuple(c.name for c in _REGISTRY.values() if c.supports_iterative)


def __getattr__(attr):   # CRITERIA: the registered names, read when asked (PEP 562)
    if attr == "CRITERIA":
        return criterion_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
