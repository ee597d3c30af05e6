"""The pruning-criterion registry (`alpaca_jax/prune/registry.py`): every registered criterion
carries its metadata, an unknown name says what is registered, and one registration is all a new
criterion needs to be usable by `prune_plan` and the settings checks."""
import jax
import numpy as np
import pytest

from alpaca_jax import init_params
from alpaca_jax.config import ModelConfig
from alpaca_jax.prune import (CRITERIA, canonical_criterion, criterion_names,
                              criterion_needs_calibration, get_criterion, protection, prune_plan,
                              register_criterion, registered_criteria)
from alpaca_jax.prune import registry

LAYERS = 6


def test_unknown_criterion_lists_the_registered_names():
    with pytest.raises(ValueError, match="unknown pruning criterion 'entropy'") as err:
        get_criterion("entropy")
    for name in criterion_names():
        assert name in str(err.value)
    assert "taylor_plus" in str(err.value)
    for call in (lambda: canonical_criterion("entropy"), lambda: protection("entropy"),
                 lambda: criterion_needs_calibration("entropy")):
        with pytest.raises(ValueError, match="registered: ppl, taylor"):
            call()


def test_every_registered_criterion_carries_its_metadata():
    names = criterion_names()
    assert tuple(CRITERIA) == names
    assert set(names) >= {"ppl", "taylor", "taylor+", "magnitude", "bi", "random", "angular"}
    for c in registered_criteria():
        assert isinstance(c.name, str) and c.name and callable(c.score)
        assert isinstance(c.needs_calibration, bool) and isinstance(c.supports_iterative, bool)
        assert isinstance(c.summary, str) and c.summary
        kf, kl = c.protection
        assert isinstance(kf, int) and isinstance(kl, int) and kf >= 0 and kl >= 0
        assert c.per_block or callable(c.plan)
        for alias in (c.name, *c.aliases):
            assert get_criterion(alias) is c and canonical_criterion(alias) == c.name
    # what used to be spread over scores.py, select.py and the finetune app
    assert [n for n in names if not criterion_needs_calibration(n)] == ["magnitude", "random"]
    assert [c.name for c in registered_criteria() if c.supports_iterative] == ["ppl"]
    assert protection("taylor_plus") == (4, 2) and protection("angular") == (0, 0)
    assert protection("taylor+", keep_first=1) == (1, 2)


def test_a_registered_criterion_is_usable_everywhere(monkeypatch):
    """Adding a criterion is one registration: prune_plan, block_scores and the settings
    check accept it with no other change."""
    from alpaca_jax.recipe.checks import check_prune
    from alpaca_jax.recipe.settings import PruneCfg

    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=LAYERS,
                      num_heads=4, num_kv_heads=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_criterion("depth", aliases=("deepest",), needs_calibration=False, keep_last=1,
                       summary="later blocks first")(
        lambda params, cfg, ids, **kw: -np.arange(cfg.num_layers, dtype=float))
    plan = prune_plan(params, cfg, None, "deepest", 2)
    assert plan["criterion"] == "depth" and plan["keep_last"] == 1
    assert plan["pruned"] == [LAYERS - 3, LAYERS - 2]
    check_prune(PruneCfg(criterion="depth", n_blocks=1))
    with pytest.raises(ValueError, match="re-scores with the ppl criterion; got 'depth'"):
        check_prune(PruneCfg(criterion="depth", n_blocks=1, iterative=True))
    with pytest.raises(ValueError, match=r"'deepest' is already registered \(by 'depth'\)"):
        register_criterion("deepest", needs_calibration=False)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="reserved"):
        register_criterion("none", needs_calibration=False)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="needs a plan hook"):
        register_criterion("runs", needs_calibration=True, per_block=False)(lambda *a, **k: None)
