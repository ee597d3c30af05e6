"""The ablation pipeline: one run of a compression recipe, stage by stage.

    python experiments/pipeline.py                                  # the default experiment
    python experiments/pipeline.py -m experiment=criteria_20pct
    python experiments/pipeline.py -m prune.criterion=ppl,bi,angular seed=0,1,2
    python experiments/pipeline.py stages=[baseline,prune,evaluate] prune.criterion=bi

Stages (`stages=`, in the order listed; `evaluate` may be listed more than once; `skip=` leaves
some out): baseline, prune, heal, quantize, evaluate, export, benchmark
(`alpaca_jax/recipe/stages.py` says what each does and reads). `quant.method` decides how
quantization meets training: `qat`, heal trains through the quantizer wherever quantize is
listed; `ptq`, quantize rounds the weights after heal. Every stage's output is kept in the run
dir (`stages/<tag>.json`, `block_scores.json`, the checkpoints, the GGUFs): a re-run in the same
dir reuses what its settings (and all upstream settings) still match and resumes training.
`results.json` (RESULTS_SCHEMA.md) is written at the end.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.app import hydra_app  # noqa: E402

main = hydra_app("pipeline")

if __name__ == "__main__":
    main()
