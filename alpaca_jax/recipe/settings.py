"""The settings of a recipe run, as dataclasses: the Hydra schema (`experiments/app.py`
registers them, so an unknown key or a wrong type fails at composition) and what every stage
reads. The library never sees a DictConfig."""
from __future__ import annotations

from dataclasses import dataclass, field

from alpaca_jax.parallel.cluster import DistributedCfg
from alpaca_jax.parallel.mesh import MeshCfg
from alpaca_jax.tracking import LoggerConfig
from alpaca_jax.train.distill import DistillConfig
from alpaca_jax.train.loop import TrainConfig


@dataclass
class ModelSourceCfg:
    source: str = "smollm2-135m-instruct"  # registered name, HF directory, .gguf, or hub id
    # auto: the checkpoint's own float dtype (a bf16 checkpoint stays bf16; quantized GGUF
    # tensors dequantize to float32); or float32 | bfloat16 | float16. Trainable leaves get
    # float32 master copies whatever this is.
    param_dtype: str = "auto"
    compute_dtype: str = "float32"   # bfloat16: bf16 matmuls (weights cast per matmul)
    # what the backward keeps of each block: block (recompute it; the training default),
    # none, dots_saveable, dots_with_no_batch_dims_saveable, offload_dot_with_no_batch_dims
    remat: str = "block"
    attention: str = "auto"          # auto (cuDNN on a GPU in bf16, else XLA) | xla | cudnn


@dataclass
class EvalCfg:
    corpora: list[str] = field(default_factory=lambda: ["wiki", "tiny"])
    ctx_len: int = 512
    max_tokens: int = 4096   # first N tokens of each corpus (the 2-core CPU budget)
    batch_size: int = 8
    # false: documents with markup (<doc> lines, <|endoftext|>) removed, joined by blank lines.
    # true: the file as it is on disk, special tokens parsed (how the reference figures in RESULTS.md were taken).
    raw_text: bool = False
    prompts: list[str] = field(default_factory=lambda: ["What is the capital of France?"])
    chat: bool = True
    max_new_tokens: int = 48
    # lm-evaluation-harness tasks, groups or tags, run by lm_eval.simple_evaluate through our
    # model: the offline suite (alpaca_jax/eval/tasks/: offline_piqa ...; tag offline_zeroshot)
    # or lm-eval's own names (eval=paper; those download their data from the Hub)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None       # lm-eval's limit: the first N documents of each task
    num_fewshot: int | None = None      # None: each task's own (0 for all of ours)
    task_batch_size: int = 8            # rows per padded forward
    bootstrap_iters: int = 1000         # lm-eval's stderr of non-mean metrics (perplexity)
    include_path: list[str] = field(default_factory=list)   # more folders of task YAMLs
    instruction_samples: int = 3        # pipeline: held-out prompts generated (exact match on
                                        # data=synthetic); the held-out loss uses all of them


@dataclass
class DataCfg:
    # a .json/.jsonl file of Alpaca records, `synthetic` (generated, exactly checkable), or a
    # hub dataset name (tatsu-lab/alpaca, yahma/alpaca-cleaned)
    source: str = "data/alpaca/alpaca_small.json"
    max_records: int | None = None   # the first N records (before the split), None = all
    synthetic_size: int = 2000
    val_size: int = 100
    cutoff_len: int = 256            # tokens per example; longer ones are truncated (counted)
    seq_len: int = 256               # row length after packing
    packing: bool = True
    split_seed: int = 0


@dataclass
class PeftCfg:
    """Group `peft`: `none` trains every weight; `lora` / `dora` train adapters only."""
    # none (full fine-tuning) | a registered PEFT method (alpaca_jax/peft/methods/: lora, dora)
    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # short names (q k v o gate up down), kernel names (wq ...), HF names (q_proj ...), globs, all
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    scaling: str = "standard"        # standard: alpha / r; rslora: alpha / sqrt(r)
    init_seed: int = 0               # the key that draws the A matrices


@dataclass
class QuantCfg:
    """Group `quant`: `ptq` evaluates round-to-nearest weights (no training); `qat` trains through
    the fake quantizer (full fine-tuning, or LoRA over the quantized base with `peft=`)."""
    method: str = "none"             # none | ptq | qat
    # a registered format (alpaca_jax/quant/formats/: q8_0, q4_0, q4_1, int8_channel, int4_g32 ...)
    format: str = "q8_0"
    embed: str = "auto"              # auto (llama.cpp's choice) | none (float) | a format
    head: str = "auto"
    activations: bool = False        # 8-bit blocks on matmul inputs, as llama.cpp's CPU path


@dataclass
class PruneCfg:
    """Group `prune`: score blocks on calibration data and remove the least important (the
    criteria: `alpaca_jax.prune`); healing is the `heal` stage (Shortened LLaMA: LoRA r8)."""
    # none | a registered criterion (alpaca_jax/prune/criteria/: ppl, taylor+, bi, angular ...)
    criterion: str = "none"
    n_blocks: int | None = None      # exactly one of n_blocks and ratio
    ratio: float | None = None       # of the blocks: the largest n with n / L <= ratio
    keep_first: int | None = None    # blocks never removed; None: the paper's default
    keep_last: int | None = None     # (taylor+: first 4 and last 2; other criteria: none)
    iterative: bool = False          # ppl only: re-score after each removal
    # a built-in corpus name, text file or hub dataset (sampled as the paper does), or an [N, T]
    # .npy file of token ids; c4 keeps calibration apart from the wiki evaluation text
    calib: str = "c4"
    calib_samples: int = 10
    calib_len: int = 128
    seed: int = 1234                 # calibration sampling (the authors' seed) and `random`
    batch_size: int | None = None    # calibration rows per scoring pass; None: all at once


@dataclass
class ExportCfg:
    """Group `export`: GGUF files of the model, checked against the JAX model and timed in
    llama.cpp (the CPU int8 runtime)."""
    qtypes: list[str] = field(default_factory=lambda: ["F16", "Q8_0", "Q4_0"])
    parity_tokens: int = 256         # wiki tokens for logits parity (KL) vs JAX; 0 skips it
    # the float model of the "KL vs float" figure (a run dir or a model source); None: the
    # exported model's own unquantized weights. Name it for a QAT run, whose float weights
    # trained toward the grid and are no longer the model the file stands in for.
    float_reference: str | None = None
    prompts: list[str] = field(default_factory=lambda: [
        "What is the capital of France?", "Give three tips for staying healthy.",
        "Translate 'good morning' into Spanish.", "What is 12 times 7?",
        "Name a primary colour."])
    max_new_tokens: int = 32         # greedy answers, llama.cpp vs JAX; no prompts skips it
    bench: bool = True               # speed and memory in llama.cpp
    threads: list[int] = field(default_factory=lambda: [1, 2])
    prompt_tokens: int = 128
    gen_tokens: int = 64
    repeats: int = 5                 # medians of this many runs (after one warm-up)
    jax_bench: bool = True           # the JAX fp32 model's greedy generation tokens/s beside


@dataclass
class Job:
    """One run of a compression recipe (`experiments/pipeline.py`, `alpaca_jax.recipe.run`): the
    listed stages run in order (`evaluate` may be listed more than once), each one left out is
    skipped; loading the model is implicit and first. Every preset (finetune, prune, evaluate,
    export) is this job with its own `stages` and defaults."""
    stages: list[str] = field(default_factory=lambda: [
        "baseline", "prune", "heal", "quantize", "evaluate", "export", "benchmark"])
    skip: list[str] = field(default_factory=list)   # stages left out, e.g. [heal]: sweep
                                                    # `skip=[],[heal]` for with/without healing
    name: str = "default"            # the experiment's name in tables
    # the default of train.seed and peft.init_seed (training order, dropout, adapter init; the
    # YAMLs interpolate ${seed}, so an explicit train.seed= wins); sweep it for mean +- std
    seed: int = 0
    # load a finished run's final model (its recorded stages replayed) instead of model.source
    run_dir: str | None = None
    drop_blocks: list[int] = field(default_factory=list)   # blocks removed at load (unhealed)
    # the device mesh every stage runs on (data x fsdp x tensor, logical-axis rules) and the
    # multi-process cluster it may span (alpaca_jax/parallel/)
    mesh: MeshCfg = field(default_factory=MeshCfg)
    distributed: DistributedCfg = field(default_factory=DistributedCfg)
    model: ModelSourceCfg = field(default_factory=ModelSourceCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftCfg = field(default_factory=PeftCfg)
    # the heal stage's objective: sft | kd | kd+sft, the teacher, tau (train/distill.py)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quant: QuantCfg = field(default_factory=QuantCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
