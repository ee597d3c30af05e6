"""Export a model to GGUF and check and time it in llama.cpp: the recipe run under the
`export` preset (conf/export.yaml: stages export, benchmark).

    python experiments/export.py                                  # SmolLM2: F16, Q8_0, Q4_0
    python experiments/export.py run_dir=<a finished run>         # that run's final model
    python experiments/export.py drop_blocks=[3,5,12,13,14,17]    # SmolLM2 without 6 blocks
    python experiments/export.py export=q8_0 export.bench=false   # one file, parity checks only

For each qtype, into the run dir: `model-<qtype>.gguf`, its parity against the JAX model, greedy
answers on both sides, tokens/s and peak RSS in llama.cpp beside the bandwidth bound
(`alpaca_jax/export/report.py`); a table is printed at the end.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.app import hydra_app  # noqa: E402


def _table(results):
    from alpaca_jax.export.report import table

    print(table(results))


main = hydra_app("export", after=_table)


if __name__ == "__main__":
    main()
