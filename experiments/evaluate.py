"""Evaluate a model: the recipe run under the `evaluate` preset (conf/evaluate.yaml: the one
stage `evaluate`): perplexity on text corpora, lm-eval tasks, generations for a few prompts.

    python experiments/evaluate.py                         # SmolLM2-135M-Instruct, defaults
    python experiments/evaluate.py eval.max_tokens=16384 eval.ctx_len=1024
    python experiments/evaluate.py model.source=/path/to/hf_dir
    python experiments/evaluate.py eval=suite                # + the offline lm-eval tasks
    python experiments/evaluate.py eval=paper                # lm-eval's own tasks (Hub data)
    python experiments/evaluate.py run_dir=outputs/...      # a finished run's final model

Metrics are `final/ppl_<corpus>`, `final/<task>/<metric>`; `harness` holds lm-eval's provenance.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.app import hydra_app  # noqa: E402

main = hydra_app("evaluate")

if __name__ == "__main__":
    main()
