"""Fine-tune on Alpaca-schema data and evaluate before and after: the recipe run under the
`finetune` preset (conf/finetune.yaml), with the overrides this app has always taken.

    python experiments/finetune.py                                   # SmolLM2, alpaca_small
    python experiments/finetune.py data=synthetic train=quick logger=disabled
    python experiments/finetune.py -m train.lr=1e-5,3e-5             # a sweep
    python experiments/finetune.py peft=lora_r8                      # LoRA (Shortened LLaMA recipe)
    python experiments/finetune.py peft=dora_r8 quant=qat_q4_0 peft.dropout=0   # QAT over DoRA

Stages, unless `stages=` is given: baseline, [prune, evaluate], [quantize, evaluate], heal,
evaluate; `quant.method=ptq` trains nothing. The adapter is written in HF PEFT's format to
`<run dir>/adapter`. Re-running with the same `hydra.run.dir` resumes.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.app import hydra_app, translate  # noqa: E402

# this app's old evaluation keys, and prune.heal, in the one schema's terms
RENAMES = {"eval.corpus": lambda v: [f"eval.corpora=[{v}]"],
           "eval.ppl_tokens": "eval.max_tokens", "eval.samples": "eval.instruction_samples"}


def _heal(value: str) -> list[str]:
    if value.lower() in ("false", "0", "no"):
        return ["skip=[heal]"]
    if value.lower() in ("true", "1", "yes"):
        return []
    raise ValueError(f"prune.heal={value!r}: true or false (a sweep over it is skip=[],[heal])")


RENAMES["prune.heal"] = _heal


def stages(job):
    """The finetune/prune preset's stages: evaluate after each change to the model."""
    if job.stages:
        return job
    out = ["baseline"]
    if job.prune.criterion != "none":
        out += ["prune", "evaluate"]
    if job.quant.method != "none":
        out += ["quantize", "evaluate"]
    if job.quant.method != "ptq" and "heal" not in job.skip:
        out += ["heal", "evaluate"]
    return replace(job, stages=out)


def main(config_name: str = "finetune"):
    sys.argv[1:] = translate(sys.argv[1:], RENAMES)
    return hydra_app(config_name, stages)()


if __name__ == "__main__":
    main()
