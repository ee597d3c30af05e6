"""Depth pruning, then healing and evaluation (Shortened LLaMA, Kim et al. 2024).

    python experiments/prune.py                                    # PPL, 20%, LoRA healing
    python experiments/prune.py prune=taylor_plus_20pct            # Taylor+
    python experiments/prune.py prune=bi_20pct prune.ratio=0.35 prune.heal=false
    python experiments/prune.py -m prune=ppl_20pct,taylor_plus_20pct,magnitude_20pct,bi_20pct,random_20pct

Scores every block on calibration windows (`prune.calib`, the paper's sampling), removes the
lowest, writes `block_scores.json` (criterion, scores, order, pruned), heals as
`experiments/finetune.py` trains (the `peft`, `train` and `data` groups), and evaluates the
unpruned (`base/`), pruned (`before/`) and healed (`after/`) models into `results.json`.
A re-run in the same run dir reuses the scores and resumes training from its checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments.app import hydra_app  # noqa: E402
from experiments.finetune import run  # noqa: E402
from experiments.schema import FinetuneJob  # noqa: E402

main = hydra_app("prune", FinetuneJob, run)

if __name__ == "__main__":
    main()
