"""Structured-config schemas for every config group: the one source of every default.

Each group's YAML files in ``conf/`` merge onto one of these dataclasses, so an unknown key, a
value of the wrong type or a choice outside its enum fails when Hydra composes the config, before
any model loads. A YAML file (a group option, a preset) sets only what differs from the defaults
here (tests/test_defaults.py). A field's lower bound is declared with it (positive, not_negative);
summ/validation.py checks those and the rules a type cannot express right after composition.
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from summ.errors import ConfigError


def _choices(name: str, *values: str) -> type[enum.StrEnum]:
    """A closed choice named by its values (as YAML and the command line write them, "4bit" too)."""
    return enum.StrEnum(name, [(v, v) for v in values])


def positive(default: Any) -> Any:
    """A field summ/validation.py refuses at or below 0 (null, where allowed, is not set)."""
    return field(default=default, metadata={"low": 0, "strict": True})


def not_negative(default: Any) -> Any:
    """A field summ/validation.py refuses below 0."""
    return field(default=default, metadata={"low": 0, "strict": False})


RougeTokenizer = _choices("RougeTokenizer", "whitespace", "morpheme")
DataSource = _choices("DataSource", "bundled", "csv", "synthetic")
# api: a hosted chat model (model=solar_api, summ/inference/solar.py), evaluated, not trained
ModelKind = _choices("ModelKind", "seq2seq", "causal", "api")
Precision = _choices("Precision", "no", "fp16", "bf16")
Scheduler = _choices("Scheduler", "linear", "cosine", "constant")
Optimizer = _choices(
    "Optimizer", "adamw", "adamw_fused", "adamw_foreach", "adamw_8bit", "paged_adamw_8bit", "adafactor"
)
CompileMode = _choices("CompileMode", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Quantization = _choices("Quantization", "none", "8bit", "4bit")
InferenceQuantization = _choices("InferenceQuantization", "none", "dynamic_int8", "bnb_8bit", "bnb_4bit")
Mode = _choices("Mode", "train", "predict")
Tracker = _choices("Tracker", "none", "tensorboard", "wandb", "mlflow")
DType = _choices("DType", "float32", "bfloat16", "float16")
Padding = _choices("Padding", "longest", "max_length")
EnsembleStrategy = _choices("EnsembleStrategy", "mbr", "weighted", "stacking", "logit_avg")
Attention = _choices("Attention", "eager", "sdpa", "sdpa_varlen", "flash_attention_2", "flex_attention")
Objective = _choices(  # the last: two values, a Pareto study
    "Objective",
    "train_seconds_per_sample",
    "train_seconds_per_token",
    "eval_loss",
    "neg_rouge_mean",
    "seconds_per_sample_and_rouge",
)
PromptStrategy = _choices("PromptStrategy", "zero_shot", "few_shot_standard", "few_shot_chat")
AugmentationMethod = _choices("AugmentationMethod", "turn_shuffle", "synonym", "back_translation", "paraphrase")
TTAMethod = _choices("TTAMethod", "reorder", "mask", "synonym", "paraphrase")
GenerationKind = _choices("GenerationKind", "none", "local", "solar")
Split = _choices("Split", "test", "dev")
TinyArch = _choices("TinyArch", "bart", "llama")


@dataclass
class DataConfig:
    name: str = MISSING
    # bundled: the sample shipped inside the package | csv: competition CSVs under data.dir | synthetic: generated
    source: DataSource = DataSource.bundled
    dir: str | None = None  # folder with train.csv / dev.csv / test.csv (source=csv)
    train_file: str = "train.csv"
    dev_file: str = "dev.csv"
    test_file: str = "test.csv"
    max_train_samples: int | None = positive(None)  # first N after loading (null = all)
    max_eval_samples: int | None = positive(None)
    encoder_max_len: int = 512  # tokens; dialogue is truncated to this (512 / 100: the official baseline's)
    decoder_max_len: int = 100  # tokens; summary is truncated to this
    group_by_length: bool = False  # length-grouped training batches (less padding), batch order still shuffled
    padding: Padding = Padding.longest  # longest: to the longest sample in each batch | max_length: fixed shapes
    packing: bool = False  # causal LMs: a micro-batch's samples in rows without padding; README, "Packing"
    max_packed_len: int | None = positive(None)  # packing: rows of at most this many positions; null: one row
    validate: bool = False  # score every sample (summ/data/quality.py); drop training samples under the threshold
    quality_threshold: float = 0.7
    num_workers: int | None = not_negative(None)  # DataLoader workers; null: CUDA 2 (collating during steps), CPU 0
    # source=synthetic only
    synthetic_train_size: int = 12457
    synthetic_eval_size: int = 499
    synthetic_seed: int = 0


@dataclass
class TinyArchConfig:
    """Architecture of a randomly initialised test-size model (no download)."""

    arch: TinyArch = TinyArch["bart"]
    d_model: int = 64
    layers: int = 2  # per stack (encoder and decoder for BART)
    heads: int = 4
    kv_heads: int = 2  # llama only (grouped-query attention)
    ffn_dim: int = 128
    dropout: float = 0.1
    max_positions: int = 1024
    vocab_size: int | None = None  # null: the tokenizer's; set a real model's (e.g. 128256) for its logits memory


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = positive(16)
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = MISSING
    kind: ModelKind = ModelKind.seq2seq
    hub_id: str | None = None  # where the weights come from when path is null (local HF cache only)
    path: str | None = None  # local folder with config.json + *.safetensors (or a training run's folder)
    tiny: TinyArchConfig | None = None  # set: build this architecture with random init (unless path is set)
    # Causal LMs: the prompt around the dialogue; the summary follows it, then the EOS token.
    prompt_template: str = "{dialogue}"
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: Quantization = Quantization["none"]  # bitsandbytes; 4bit = QLoRA with NF4, bf16 compute
    gradient_checkpointing: bool = False
    dtype: DType = DType["float32"]  # weights as loaded (mixed precision is train.mixed_precision)
    attn_implementation: Attention | None = None  # null: transformers' (sdpa); sdpa_varlen: summ/modeling/varlen.py
    trust_remote_code: bool = False


@dataclass
class BatchConfig:
    name: str = MISSING
    batch_size: int = positive(8)  # micro-batch per process
    gradient_accumulation_steps: int = positive(1)
    # Set to fix the samples per optimizer step; accumulation is then derived from it.
    effective_batch_size: int | None = positive(None)
    eval_batch_size: int = positive(16)
    max_tokens: int | None = positive(None)  # micro-batches of this many padded positions, not batch_size samples


@dataclass
class TrainConfig:
    epochs: int = positive(15)  # passes over the training set (ignored when max_steps, total_samples or measure.* set)
    max_steps: int | None = positive(None)  # optimizer steps; overrides epochs
    # Training samples to process (overrides epochs, max_steps): every cell then sees as many (to a batch)
    total_samples: int | None = positive(None)
    learning_rate: float = positive(2.0e-3)  # tiny models learn fast; kobart's baseline 1e-5, QLoRA 1e-4 to 2e-4
    warmup_ratio: float = not_negative(0.1)  # fraction of optimizer steps with linear warmup
    weight_decay: float = not_negative(0.01)  # AdamW; never applied to biases and norm weights
    adam_epsilon: float = not_negative(1e-8)
    max_grad_norm: float = not_negative(1.0)  # 0 turns clipping off
    label_smoothing: float = not_negative(0.0)
    scheduler: Scheduler = Scheduler.linear  # constant: constant after the warmup
    optimizer: Optimizer = Optimizer.adamw  # adamw: fused where the device has it; README, "The optimizer"
    compile: bool = False  # torch.compile the model, compiled before the measured steps; README, "torch.compile"
    compile_mode: CompileMode = CompileMode.default  # torch.compile's mode (reduce-overhead: CUDA graphs)
    mixed_precision: Precision = Precision.no  # fp16 needs CUDA; bf16 autocast also runs on CPUs
    seed: int = 42
    log_every_steps: int = positive(10)  # optimizer steps between progress updates (the bar; a log line without a tty)
    cpu: bool = False  # force the CPU even where CUDA is present
    save_model: bool = True  # weights (or LoRA adapter), tokenizer and config into <run dir>/model (sweep trials: off)
    k_folds: int = positive(1)  # > 1: K models on K splits of the training set, out-of-fold predictions, ensemble
    fold_seed: int = 0  # how samples are dealt into folds
    fold: int | None = None  # set by the K-fold driver: this job trains without fold `fold`
    # Accelerate's state into <run dir>/checkpoints/step_<n> every N optimizer steps (null: on SIGINT / SIGTERM)
    save_every_steps: int | None = positive(None)
    keep_checkpoints: int = positive(2)  # newest checkpoints kept; older ones are deleted
    # Continue a run: "latest" (this run folder's newest checkpoint; pass hydra.run.dir=<that run>),
    # a run folder, or one checkpoint folder. Same steps, schedule position and data order.
    resume_from: str | None = None


@dataclass
class MeasureConfig:
    warmup_steps: int = not_negative(3)  # optimizer steps left out of every timing figure (allocator, kernels)
    steps: int | None = positive(None)  # stop after this many measured optimizer steps; null = the full schedule
    # The window in samples instead: every cell of a sweep measures the same ones (in whole steps of each)
    samples: int | None = positive(None)
    warmup_samples: int | None = not_negative(None)  # warm-up in samples (taken from outside the measured window)
    memory_budget_gb: float | None = positive(None)  # plan for a smaller card: null = the device's own capacity
    headroom: float = 0.9  # over budget x headroom the trial stops with status over_budget
    memory_probe: bool = True  # one micro-batch at the maximum widths before the measured steps: the worst case
    phase_timing: bool = True  # each measured step's time by phase (train.phase_seconds): no added device waits
    # the last warm-up step recorded with torch.profiler (and on CUDA a memory snapshot) into <run>/profile
    profile: bool = False
    peak_tflops: float | None = positive(None)  # device peak for MFU; null: the built-in table (CUDA), no MFU (CPU)
    rss_interval_ms: float = positive(2.0)  # RSS sampling period: CPU peak memory where VmHWM cannot be reset
    # CPU: tensors from 64 KiB up served by mmap, so the resident peak tracks live tensors (slower
    # training: README, "What a run measures"); false: glibc's own heap, fast, peak includes memory it kept
    cpu_live_memory: bool = True
    # Several processes: a collective one of them never reaches fails after this many seconds (the cell
    # ends failed, the sweep stops) instead of torch's watchdog (10 min NCCL, 30 min gloo); null: in a
    # sweep's trials sweep.trial_collective_timeout_s, else torch's (a big model's save may keep others waiting)
    collective_timeout_s: float | None = positive(None)


@dataclass
class EvalConfig:
    enabled: bool = True
    generate: bool = True  # generate summaries and score ROUGE (false: eval loss only, faster)
    # whitespace: the baseline's `rouge` package on whitespace tokens | morpheme: kiwipiepy's, as the competition scores
    rouge_tokenizer: RougeTokenizer = RougeTokenizer.whitespace
    save_predictions: bool = True  # dev_predictions.csv in the run folder


@dataclass
class InferenceConfig:
    name: str = MISSING
    num_beams: int = positive(4)  # 4 beams, at most 100 new tokens: the official baseline's decoding
    max_new_tokens: int = positive(100)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # Inference speed (summ/inference/predict.py): how summaries are generated, measured per run.
    quantization: InferenceQuantization = InferenceQuantization["none"]  # dynamic_int8: CPU, torch
    batch_size: int | None = positive(None)  # prompts per generate() call; null = batch.eval_batch_size
    sort_by_length: bool = True  # batches of similar prompt length (less padding); output order is kept
    compare_unquantized: bool = True  # a quantized run also generates unquantized: ROUGE change and speed-up


@dataclass
class PredictConfig:
    """mode=predict: summaries for the test set from a trained run (model.path=<run dir>)."""

    submission: bool = True  # <run dir>/submission.csv (fname,summary) in the test file's order
    split: Split = Split["test"]  # which file to summarise into the submission


@dataclass
class AugmentationConfig:
    name: str = MISSING
    methods: list[AugmentationMethod] = field(default_factory=list)
    ratio: float = not_negative(0.0)  # new samples per training sample, per method
    seed: int = 0
    shuffle_window: int = 3  # turn_shuffle: turns are shuffled inside windows of this many
    synonym_rate: float = 0.3  # synonym: share of lexicon nouns replaced


@dataclass
class TTAConfig:
    name: str = MISSING
    methods: list[TTAMethod] = field(default_factory=list)
    num_aug: int = not_negative(0)  # perturbed copies per evaluation dialogue (methods used in turn)
    seed: int = 0
    shuffle_window: int = 3
    synonym_rate: float = 0.3
    mask_rate: float = 0.15  # mask: share of words replaced by the tokenizer's mask token (or dropped)


@dataclass
class GenerationBackendConfig:
    """Where back-translation and paraphrase text comes from (summ/inference/backends.py)."""

    kind: GenerationKind = GenerationKind["none"]  # local: the seq2seq folders below | solar: the API
    ko_en_path: str | None = None  # local seq2seq folder, e.g. a MarianMT ko->en checkpoint
    en_ko_path: str | None = None
    paraphrase_path: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 128
    num_beams: int = 4
    cache_dir: str = "outputs/.cache"  # generated text is cached here across runs and sweeps


@dataclass
class EnsembleConfig:
    """How K-fold members' summaries of one dialogue become one (summ/inference/ensemble.py)."""

    # mbr: the summary the members agree on most | weighted: agreement weighted by dev ROUGE
    # | stacking: a selector trained out of fold | logit_avg: one beam search on averaged log-probabilities
    strategy: EnsembleStrategy = EnsembleStrategy["mbr"]
    stacking_candidates: int = 4  # top beams per out-of-fold dialogue that train the stacking selector


@dataclass
class SolarConfig:
    """The Solar API client (summ/inference/solar.py): model=solar_api, or generation.kind=solar.
    The key is read from the environment variable named here, never from the config."""

    base_url: str = "https://api.upstage.ai/v1"  # OpenAI-compatible; the older notebook: .../v1/solar
    model: str = "solar-mini"  # the older notebook: solar-1-mini-chat; also solar-pro2
    api_key_env: str = "UPSTAGE_API_KEY"
    prompt_strategy: PromptStrategy = PromptStrategy["few_shot_chat"]  # few_shot_standard: examples inline
    num_examples: int = not_negative(1)  # few-shot: training dialogues shown as examples
    temperature: float = 0.2
    top_p: float = 0.3
    max_tokens: int = positive(256)
    requests_per_minute: float = positive(100.0)  # client-side throttle (the competition's limit)
    concurrency: int = positive(4)  # requests in flight at once
    max_retries: int = not_negative(5)  # on 429, 5xx and timeouts (a refused connection fails at once)
    backoff_s: float = not_negative(1.0)  # first wait when the server sends no Retry-After; doubles each retry
    max_backoff_s: float = not_negative(60.0)
    timeout_s: float = positive(60.0)  # per request
    cache_dir: str | None = "outputs/.cache"  # answers cached on disk by prompt; null = no cache


@dataclass
class TrackingConfig:
    """Experiment trackers through Accelerate (summ/training/tracking.py). Never fails a run."""

    name: Tracker = MISSING  # the group's choice (conf/tracking/): none, tensorboard, wandb, mlflow
    project: str = "summ"  # project (wandb) / experiment (mlflow); a sweep's runs are grouped by its folder
    dir: str | None = None  # local files: null = <run dir>/tracking (tensorboard), outputs/ (wandb)
    mlflow_tracking_uri: str | None = None  # null = sqlite:///outputs/mlflow.db; or a server http://...
    wandb_mode: str | None = None  # null = offline unless WANDB_API_KEY is set
    log_every_steps: int = positive(1)  # optimizer steps between logged points (sent from a background thread)


@dataclass
class SweepConfig:
    """How multirun jobs behave (they are measurement trials unless told otherwise)."""

    # A multirun job that sets no window measures this many samples after trial_warmup_samples (the same
    # in every cell: summ/data/sampler.py; null: the full schedule), in whole optimizer steps (192: x of 64, 3)
    trial_samples: int | None = positive(192)
    trial_warmup_samples: int = not_negative(64)
    trial_collective_timeout_s: float = positive(300)  # measure.collective_timeout_s of a trial that sets none
    evaluate: bool = False  # multirun jobs evaluate only if this, or eval.enabled on the command line, asks
    resume: bool = False  # reuse a job folder's complete result when its config hash matches
    # A finished sweep folder (a grid, an earlier search): a job whose config matches one of its
    # cells takes that cell's result instead of measuring it again.
    reuse_from: str | None = None
    reuse_loaded: bool = True  # a sweep process's cells share its data and loaded model (reset per cell)
    then_train: bool = False  # the recommended cell trained for its full schedule into <sweep>/final


@dataclass
class KneeConfig:
    """The knee report's recommendation rule (summ/reports/knee.py)."""

    tolerance: float = not_negative(0.05)  # cells within this fraction of the best samples/s count as "as fast"


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    batch: BatchConfig = MISSING
    inference: InferenceConfig = MISSING
    augmentation: AugmentationConfig = MISSING
    tta: TTAConfig = MISSING
    tracking: TrackingConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationBackendConfig = field(default_factory=GenerationBackendConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    knee: KneeConfig = field(default_factory=KneeConfig)
    solar: SolarConfig = field(default_factory=SolarConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # train: fine-tune, then evaluate on dev | predict: load a trained run (model.path) and summarise
    mode: Mode = Mode["train"]
    save_visualizations: bool = False  # loss, samples/s and memory over steps as PNGs in the run folder
    objective: Objective = Objective["train_seconds_per_sample"]  # what a sweeper minimises
    objective_penalty: float = 1.0e6  # returned to a sweeper for a trial without a figure (oom, over_budget, ...)


def threads_per_job(jobs: Any) -> int:
    """CPU threads for each of `jobs` jobs run side by side (joblib launcher): the cores divided
    among them. Each job's torch would otherwise start one spinning thread per core, and two
    jobs on 2 cores ran 12 times slower than one alone."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = int(jobs) if jobs and int(jobs) > 0 else cores
    return max(1, cores // jobs)


def run_name(
    mode: Any,
    model: Any,
    kind: Any,
    batch_size: Any,
    accumulation: Any,
    effective_batch_size: Any = None,
    k_folds: Any = 1,
    path: Any = None,
) -> str:
    """A run folder's name after what ran: `train_tiny_bart_bs32x2`, `train_..._k5` for K-fold,
    `predict_tiny_llama` (the model the run at model.path trained), `eval_solar_api` (a hosted
    model evaluated, nothing trained)."""
    if str(mode) == "predict" or str(kind).endswith("api"):
        trained = trained_model_name(path) if str(mode) == "predict" and path else None
        return f"{'predict' if str(mode) == 'predict' else 'eval'}_{trained or model}"
    if effective_batch_size and batch_size and int(effective_batch_size) % int(batch_size) == 0:
        accumulation = int(effective_batch_size) // int(batch_size)
    return f"train_{model}_bs{batch_size}x{accumulation}" + (f"_k{k_folds}" if k_folds and int(k_folds) > 1 else "")


def trained_model_name(path: Any) -> str | None:
    """model.name in a training run's saved config (<run>/model/ or the folder itself), or None."""
    for folder in (os.path.join(os.path.expanduser(str(path)), "model"), os.path.expanduser(str(path))):
        try:
            return str(OmegaConf.load(os.path.join(folder, "summ_config.yaml")).model.name)
        except Exception:  # absent or unreadable: the run says so when it reads the folder
            continue
    return None


# Settings that change how long a failure is waited for, never what a job computes.
NOT_COMPUTED = ("measure.collective_timeout_s",)


def config_hash(cfg: DictConfig, leave_out: tuple[str, ...] = ()) -> str:
    """Identity of a job's resolved config (sweep resume and reuse, checkpoints). The `sweep`
    section is left out: setting sweep.resume=true must not make a finished cell look different;
    so is NOT_COMPUTED. `leave_out`: more keys (dotted) that do not change what is computed."""
    kept = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in ("sweep", "hydra")])
    for key in (*leave_out, *NOT_COMPUTED):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(kept, parent) if parent else kept
        if node is not None and leaf in node:
            with open_dict(node):
                del node[leaf]
    return hashlib.sha256(OmegaConf.to_yaml(kept, resolve=True).encode()).hexdigest()[:16]


def resolve_batch(
    batch_size: int, gradient_accumulation_steps: int, effective_batch_size: int | None, num_processes: int
) -> tuple[int, int, int]:
    """The one place that turns batch settings into (micro-batch, accumulation, effective batch);
    the effective batch is the samples behind one optimizer step, over all processes."""
    if effective_batch_size is None:
        ga = gradient_accumulation_steps
    else:
        per_update = batch_size * num_processes
        if effective_batch_size % per_update:
            raise ConfigError(
                f"batch.effective_batch_size={effective_batch_size} is not a multiple of "
                f"batch.batch_size x processes = {batch_size} x {num_processes}: change one of them"
            )
        ga = effective_batch_size // per_update
        if gradient_accumulation_steps not in (1, ga):  # 1: the default, which the effective batch replaces
            raise ConfigError(
                f"batch.gradient_accumulation_steps={gradient_accumulation_steps} contradicts "
                f"batch.effective_batch_size={effective_batch_size} (micro-batch {batch_size} x {num_processes} "
                f"processes needs {ga}): set one of them, or set batch.effective_batch_size=null"
            )
    return batch_size, ga, batch_size * ga * num_processes
