"""Depth pruning, then healing and evaluation (Shortened LLaMA, Kim et al. 2024): the finetune
app under the `prune` preset (conf/prune.yaml: PPL criterion, 20%, LoRA r8 healing).

    python experiments/prune.py                                    # PPL, 20%, LoRA healing
    python experiments/prune.py prune.criterion=taylor+            # Taylor+
    python experiments/prune.py prune.criterion=angular prune.ratio=0.35 prune.heal=false
    python experiments/prune.py -m prune.criterion=ppl,taylor+,magnitude,bi,angular,random

Evaluates the unpruned (`baseline/`), pruned (`after_prune/`) and healed (`final/`) models;
`block_scores.json` holds the scores. A re-run in the same run dir reuses the scores and resumes
training.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.finetune import main  # noqa: E402

if __name__ == "__main__":
    main("prune")
