"""The README's Python examples run as written. Its `python` blocks continue one session and are
executed in order in a temporary directory: the first on the embedded SmolLM2, the rest (as the
README says) on a tiny random model with SmolLM2's tokenizer so that training, pruning and export
take seconds."""
import re

import jax
import numpy as np
import pytest

from alpaca_jax import init_params
from alpaca_jax.paths import REPO_ROOT

pytestmark = pytest.mark.real_model

BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(),
                    re.S | re.M)


def test_the_readme_has_the_examples_it_describes():
    starts = [b.splitlines()[0] for b in BLOCKS]
    assert len(BLOCKS) == 5, starts
    assert "load_model" in BLOCKS[0] and "add_lora" in BLOCKS[1] and "to_gguf" in BLOCKS[-1]


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # `data/...` is read from the repository root wherever the session runs; here, as a user
    # working in a clone would, through a link to it
    (tmp_path / "data").symlink_to(REPO_ROOT / "data")
    ns: dict = {}
    exec(compile(BLOCKS[0], "README.md:block1", "exec"), ns)
    assert "Paris" in capsys.readouterr().out
    assert ns["logits"].shape[-1] == ns["cfg"].vocab_size
    assert (tmp_path / "out" / "config.json").is_file()

    cfg = ns["cfg"].replace(hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                            num_kv_heads=2, head_dim=16)
    ns.update(cfg=cfg, params=init_params(cfg, jax.random.PRNGKey(0)))
    for i, block in enumerate(BLOCKS[1:], 2):
        exec(compile(block, f"README.md:block{i}", "exec"), ns)
    assert np.isfinite(ns["res"].history[-1]["loss"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert ns["pruned_cfg"].num_layers == cfg.num_layers - 1          # 20% of 8 blocks
    assert (tmp_path / "model-q8_0.gguf").stat().st_size > 0
