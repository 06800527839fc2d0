"""Structured-config schemas for every config group.

Each group's YAML files in ``conf/`` merge onto one of these dataclasses, so an unknown key or a
value of the wrong type fails when Hydra composes the config, before any model loads. Value rules
that a type cannot express (a batch size of 0, an effective batch that does not divide) live in
``validate`` and run right after composition, also before any compute.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from summ.errors import ConfigError


class ModelKind(enum.Enum):
    seq2seq = "seq2seq"
    causal = "causal"
    api = "api"  # a hosted chat model (model=solar_api, summ/solar.py): evaluated, not trained


class Precision(enum.Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Scheduler(enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class RougeTokenizer(enum.Enum):
    whitespace = "whitespace"  # the baseline's `rouge` package on whitespace tokens
    morpheme = "morpheme"  # kiwipiepy morphemes first, as the competition scores


class DataSource(enum.Enum):
    bundled = "bundled"  # the sample shipped inside the package
    csv = "csv"  # competition CSVs under data.dir
    synthetic = "synthetic"  # generated, competition-shaped lengths


QUANTIZATIONS = ("none", "8bit", "4bit")
INFERENCE_QUANTIZATIONS = ("none", "dynamic_int8", "bnb_8bit", "bnb_4bit")
MODES = ("train", "predict")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
DTYPES = ("float32", "bfloat16", "float16")
PADDINGS = ("longest", "max_length")
ENSEMBLE_STRATEGIES = ("mbr", "weighted", "stacking", "logit_avg")
ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")
OBJECTIVES = ("train_seconds_per_sample", "train_seconds_per_token", "eval_loss", "neg_rouge_mean",
              "seconds_per_sample_and_rouge")  # the last returns two values, for a Pareto study


@dataclass
class DataConfig:
    name: str = MISSING
    source: DataSource = DataSource.bundled
    dir: Optional[str] = None  # folder with train.csv / dev.csv / test.csv (source=csv)
    train_file: str = "train.csv"
    dev_file: str = "dev.csv"
    test_file: str = "test.csv"
    max_train_samples: Optional[int] = None  # first N after loading (null = all)
    max_eval_samples: Optional[int] = None
    encoder_max_len: int = 512  # tokens; dialogue is truncated to this
    decoder_max_len: int = 100  # tokens; summary is truncated to this
    group_by_length: bool = False  # length-grouped training batches (less padding)
    padding: str = "longest"  # longest: to the longest sample in each batch | max_length: fixed shapes
    validate: bool = False  # score every sample (summ/quality.py); drop training samples under the threshold
    quality_threshold: float = 0.7
    num_workers: int = 0
    # source=synthetic only
    synthetic_train_size: int = 12457
    synthetic_eval_size: int = 499
    synthetic_seed: int = 0


@dataclass
class TinyArchConfig:
    """Architecture of a randomly initialised test-size model (no download)."""

    arch: str = "bart"  # bart | llama
    d_model: int = 64
    layers: int = 2  # per stack (encoder and decoder for BART)
    heads: int = 4
    kv_heads: int = 2  # llama only (grouped-query attention)
    ffn_dim: int = 128
    dropout: float = 0.1
    max_positions: int = 1024
    vocab_size: Optional[int] = None  # null: the tokenizer's; set a real model's (e.g. 128256) for its logits memory


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = MISSING
    kind: ModelKind = ModelKind.seq2seq
    hub_id: Optional[str] = None  # where the weights come from when path is null (local HF cache only)
    path: Optional[str] = None  # local folder with config.json + *.safetensors
    tiny: Optional[TinyArchConfig] = None  # set: build this architecture with random init
    # Causal LMs: the prompt around the dialogue; the summary follows it, then the EOS token.
    prompt_template: str = "{dialogue}"
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: str = "none"  # none | 8bit | 4bit (bitsandbytes; 4bit = QLoRA with NF4)
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 | float16 (mixed precision is train.mixed_precision)
    attn_implementation: Optional[str] = None  # null = transformers' default (sdpa where it can)
    trust_remote_code: bool = False


@dataclass
class BatchConfig:
    name: str = MISSING
    batch_size: int = 8  # micro-batch per process
    gradient_accumulation_steps: int = 1
    # Set to fix the samples per optimizer step; accumulation is then derived from it.
    effective_batch_size: Optional[int] = None
    eval_batch_size: int = 16


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    # Training samples to process; overrides epochs and max_steps. Cells of a sweep with this set
    # see the same number of samples whatever their effective batch (to within one batch).
    total_samples: Optional[int] = None
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.1  # of the optimizer steps
    weight_decay: float = 0.01  # not applied to biases and norm weights
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    scheduler: Scheduler = Scheduler.linear
    mixed_precision: Precision = Precision.no
    seed: int = 42
    log_every_steps: int = 10  # optimizer steps between progress-bar refreshes
    cpu: bool = False  # force the CPU even where CUDA is present
    save_model: bool = True  # weights (or LoRA adapter), tokenizer and config into <run dir>/model (sweep trials: off)
    k_folds: int = 1  # > 1: K models on K splits of the training set, out-of-fold predictions, ensemble
    fold_seed: int = 0  # how samples are dealt into folds
    fold: Optional[int] = None  # set by the K-fold driver: this job trains without fold `fold`
    # Accelerate state (model, optimizer, scheduler, RNG, data position) into
    # <run dir>/checkpoints/step_<n> every N optimizer steps (null: only on SIGINT / SIGTERM).
    save_every_steps: Optional[int] = None
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    # Continue a run: "latest" (this run folder's newest checkpoint; pass hydra.run.dir=<that run>),
    # a run folder, or one checkpoint folder. Same steps, schedule position and data order.
    resume_from: Optional[str] = None


@dataclass
class MeasureConfig:
    warmup_steps: int = 3  # optimizer steps excluded from every timing figure
    steps: Optional[int] = None  # stop after this many measured optimizer steps (sweeps)
    memory_budget_gb: Optional[float] = None  # null = the device's capacity
    headroom: float = 0.9  # a trial over budget x headroom stops with status over_budget
    peak_tflops: Optional[float] = None  # device peak for MFU; null = look it up in the device table
    rss_interval_ms: float = 2.0  # CPU only, where the kernel peak cannot be reset: RSS sampling period


@dataclass
class EvalConfig:
    enabled: bool = True
    generate: bool = True  # generate summaries and score ROUGE (else eval loss only)
    rouge_tokenizer: RougeTokenizer = RougeTokenizer.whitespace
    save_predictions: bool = True


@dataclass
class InferenceConfig:
    name: str = MISSING
    num_beams: int = 4
    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # Inference speed (summ/predict.py): how summaries are generated, measured per run.
    quantization: str = "none"  # none | dynamic_int8 (CPU, torch) | bnb_8bit | bnb_4bit (bitsandbytes)
    batch_size: Optional[int] = None  # prompts per generate() call; null = batch.eval_batch_size
    sort_by_length: bool = True  # batches of similar prompt length (less padding); output order is kept
    compare_unquantized: bool = True  # a quantized run also generates unquantized: ROUGE change and speed-up


@dataclass
class PredictConfig:
    """mode=predict: summaries for the test set from a trained run (model.path=<run dir>)."""

    submission: bool = True  # write <run dir>/submission.csv (fname,summary) for every test row
    split: str = "test"  # test | dev: which file to summarise into the submission


@dataclass
class AugmentationConfig:
    name: str = MISSING
    methods: List[str] = field(default_factory=list)  # turn_shuffle, synonym, back_translation, paraphrase
    ratio: float = 0.0  # new samples per training sample, per method
    seed: int = 0
    shuffle_window: int = 3  # turn_shuffle: turns are shuffled inside windows of this many
    synonym_rate: float = 0.3  # synonym: share of lexicon nouns replaced


@dataclass
class TTAConfig:
    name: str = MISSING
    methods: List[str] = field(default_factory=list)  # reorder, mask, synonym, paraphrase
    num_aug: int = 0  # perturbed copies per evaluation dialogue (methods used in turn)
    seed: int = 0
    shuffle_window: int = 3
    synonym_rate: float = 0.3
    mask_rate: float = 0.15  # mask: share of words replaced by the tokenizer's mask token (or dropped)


@dataclass
class GenerationBackendConfig:
    """Where back-translation and paraphrase text comes from (summ/generation.py)."""

    kind: str = "none"  # none | local | solar (the Solar API, settings under `solar`)
    ko_en_path: Optional[str] = None  # local seq2seq folder, e.g. a MarianMT ko->en checkpoint
    en_ko_path: Optional[str] = None
    paraphrase_path: Optional[str] = None
    batch_size: int = 16
    max_new_tokens: int = 128
    num_beams: int = 4
    cache_dir: str = "outputs/.cache"  # generated text is cached here across runs and sweeps


@dataclass
class EnsembleConfig:
    """How K-fold members' summaries of one dialogue become one (summ/ensemble.py)."""

    # mbr | weighted (agreement by dev ROUGE) | stacking (selector trained out of fold)
    # | logit_avg (beam search on the members' averaged next-token log-probabilities)
    strategy: str = "mbr"
    stacking_candidates: int = 4  # top beams per out-of-fold dialogue that train the stacking selector


@dataclass
class SolarConfig:
    """The Solar API client (summ/solar.py): model=solar_api, or generation.kind=solar.
    The key is read from the environment variable named here, never from the config."""

    base_url: str = "https://api.upstage.ai/v1"  # OpenAI-compatible; the older notebook: .../v1/solar
    model: str = "solar-mini"  # the older notebook: solar-1-mini-chat; also solar-pro2
    api_key_env: str = "UPSTAGE_API_KEY"
    prompt_strategy: str = "few_shot_chat"  # zero_shot | few_shot_standard (inline) | few_shot_chat (prior turns)
    num_examples: int = 1  # few-shot: training dialogues shown as examples
    temperature: float = 0.2
    top_p: float = 0.3
    max_tokens: int = 256
    requests_per_minute: float = 100.0  # client-side throttle (the competition's limit)
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 5  # on 429, 5xx, timeouts and connection errors
    backoff_s: float = 1.0  # first wait when the server sends no Retry-After; doubles each retry
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0  # per request
    cache_dir: Optional[str] = "outputs/.cache"  # answers cached on disk by prompt; null = no cache


@dataclass
class TrackingConfig:
    """Experiment trackers through Accelerate (summ/tracking.py). Never fails a run."""

    name: str = "none"  # none | tensorboard | wandb | mlflow
    project: str = "summ"  # project (wandb) / experiment (mlflow); a sweep's runs are grouped by its folder
    dir: Optional[str] = None  # local files: null = <run dir>/tracking (tensorboard), outputs/ (wandb)
    mlflow_tracking_uri: Optional[str] = None  # null = sqlite:///outputs/mlflow.db; or a server http://...
    wandb_mode: Optional[str] = None  # null = offline unless WANDB_API_KEY is set
    log_every_steps: int = 1  # optimizer steps between logged points


@dataclass
class SweepConfig:
    """How multirun jobs behave (they are measurement trials unless told otherwise)."""

    trial_steps: Optional[int] = 10  # measure.steps for a multirun job that leaves it null (null: full training)
    evaluate: bool = False  # multirun jobs evaluate only if this, or eval.enabled on the command line, asks
    resume: bool = False  # reuse a job folder's complete metrics.json when its config hash matches
    # A finished sweep folder (a grid, an earlier search): a job whose config matches one of its
    # cells takes that cell's result instead of measuring it again.
    reuse_from: Optional[str] = None


@dataclass
class KneeConfig:
    """The knee report's recommendation rule (summ/report.py)."""

    tolerance: float = 0.05  # cells within this fraction of the best samples/s count as "as fast"


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    batch: BatchConfig = MISSING
    inference: InferenceConfig = MISSING
    augmentation: AugmentationConfig = MISSING
    tta: TTAConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationBackendConfig = field(default_factory=GenerationBackendConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    knee: KneeConfig = field(default_factory=KneeConfig)
    solar: SolarConfig = field(default_factory=SolarConfig)
    tracking: TrackingConfig = MISSING
    predict: PredictConfig = field(default_factory=PredictConfig)
    # train: fine-tune, then evaluate on dev | predict: load a trained run (model.path) and summarise
    mode: str = "train"
    save_visualizations: bool = False  # loss, samples/s and memory over steps as PNGs in the run folder
    # What main() returns to a sweeper (lower is better).
    objective: str = "train_seconds_per_sample"
    # Returned to a sweeper for a trial that did not produce a figure (oom, over_budget, ...).
    objective_penalty: float = 1.0e6


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/config.yaml lists `schema` first."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config, replace=True)

    def _precisions() -> str:
        from summ.study import precision_choices

        return precision_choices()

    OmegaConf.register_resolver("summ_precisions", _precisions, replace=True)
    from summ.distributed import now

    # ${summ_now:FORMAT}: like Hydra's ${now:}, but one time for the whole launch: every job of a
    # sweep (which resolves hydra.sweep.dir once per job) and every process of a distributed launch
    OmegaConf.register_resolver("summ_now", now, replace=True)
    OmegaConf.register_resolver("summ_run_name", run_name, replace=True)

    def _study_seed(base, storage=None, study_name=None) -> int:
        from summ.study import study_seed

        return study_seed(base, storage, study_name)

    OmegaConf.register_resolver("summ_study_seed", _study_seed, replace=True)


def run_name(mode: Any, model: Any, kind: Any, batch_size: Any, accumulation: Any,
             effective_batch_size: Any = None, k_folds: Any = 1) -> str:
    """A run folder's name after what ran: `train_tiny_bart_bs32x2`, `train_..._k5` for K-fold,
    `predict_tiny_bart`, `eval_solar_api` (a hosted model evaluated, nothing trained)."""
    if str(mode) == "predict" or str(kind).endswith("api"):
        return f"{'predict' if str(mode) == 'predict' else 'eval'}_{model}"
    if effective_batch_size and batch_size and int(effective_batch_size) % int(batch_size) == 0:
        accumulation = int(effective_batch_size) // int(batch_size)
    return f"train_{model}_bs{batch_size}x{accumulation}" + (f"_k{k_folds}" if k_folds and int(k_folds) > 1 else "")


def _positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} is invalid: it must be {bound}")


def _refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """A key its schema does not have, added with Hydra's `+` (which opens the struct for it):
    `+batch.batchsize=16` would otherwise run at the default micro-batch without a word."""
    import dataclasses

    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        if key == "hydra" and not prefix:
            continue
        if known is not None and key not in known:
            raise ConfigError(f"{prefix}{key} is not a setting (a typo?): remove it; python run.py --cfg job lists "
                              f"every setting")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def validate(cfg: DictConfig | Config) -> None:
    """Value rules that types cannot express. Raises ConfigError with the key to change."""
    c: Any = cfg
    if isinstance(cfg, DictConfig):
        _refuse_unknown_keys(cfg)
    for key in ("batch.batch_size", "batch.gradient_accumulation_steps", "batch.eval_batch_size",
                "batch.effective_batch_size", "data.encoder_max_len", "data.decoder_max_len",
                "data.max_train_samples", "data.max_eval_samples", "train.epochs", "train.max_steps",
                "train.learning_rate", "train.total_samples", "measure.steps", "measure.memory_budget_gb",
                "measure.peak_tflops", "inference.num_beams", "inference.max_new_tokens",
                "measure.rss_interval_ms", "train.log_every_steps", "model.lora.r", "sweep.trial_steps",
                "tracking.log_every_steps", "train.save_every_steps", "train.keep_checkpoints"):
        _positive(key, _get(c, key))
    for key in ("measure.warmup_steps", "train.weight_decay", "train.max_grad_norm",
                "train.label_smoothing", "train.warmup_ratio", "augmentation.ratio", "tta.num_aug", "train.adam_epsilon",
                "knee.tolerance"):
        _positive(key, _get(c, key), allow_zero=True)
    if _get(c, "knee.tolerance") >= 1:
        raise ConfigError(f"knee.tolerance={_get(c, 'knee.tolerance')} is a fraction of the best samples/s: "
                          f"it must be in [0, 1) (0.05 = within 5%)")
    for key, least in (("data.encoder_max_len", 8), ("data.decoder_max_len", 4)):
        if _get(c, key) < least:
            raise ConfigError(f"{key}={_get(c, key)} is too short to hold the special tokens and any text: "
                              f"it must be >= {least}")
    if _get(c, "model.tiny") is not None:  # a real model's limit is in its config.json, read at load
        enc, dec, limit = _get(c, "data.encoder_max_len"), _get(c, "data.decoder_max_len"), _get(c, "model.tiny.max_positions")
        causal = _enum_name(_get(c, "model.kind")) == "causal"  # prompt and summary share the positions
        if (enc + dec if causal else max(enc, dec)) > limit:
            raise ConfigError(f"data.encoder_max_len={enc} and data.decoder_max_len={dec} do not fit the model's "
                              f"{limit} positions (model.tiny.max_positions): lower them")
    if not 0 <= _get(c, "data.quality_threshold") <= 1:
        raise ConfigError(f"data.quality_threshold={_get(c, 'data.quality_threshold')} must be in [0, 1]")
    if not 0 < _get(c, "measure.headroom") <= 1:
        raise ConfigError(f"measure.headroom={_get(c, 'measure.headroom')} must be in (0, 1]")
    if _get(c, "train.warmup_ratio") >= 1 or _get(c, "train.label_smoothing") >= 1:
        raise ConfigError("train.warmup_ratio and train.label_smoothing must be below 1")
    if _get(c, "model.quantization") not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization={_get(c, 'model.quantization')} is invalid: "
                          f"choose one of {', '.join(QUANTIZATIONS)}")
    from summ.augment import METHODS as AUG_METHODS
    from summ.tta import METHODS as TTA_METHODS

    for key, allowed in (("augmentation.methods", AUG_METHODS), ("tta.methods", TTA_METHODS)):
        unknown = [m for m in _get(c, key) if m not in allowed]
        if unknown:
            raise ConfigError(f"{key} has unknown {', '.join(unknown)}: choose from {', '.join(allowed)}")
    if (_get(c, "ensemble.strategy") == "stacking" and _get(c, "train.k_folds") > 1
            and _get(c, "inference.num_beams") < 2 and not _get(c, "inference.do_sample")):
        raise ConfigError("ensemble.strategy=stacking learns from several candidates per dialogue: "
                          "set inference.num_beams >= 2")
    if _get(c, "ensemble.strategy") not in ENSEMBLE_STRATEGIES:
        raise ConfigError(f"ensemble.strategy={_get(c, 'ensemble.strategy')} is not available: choose one of "
                          f"{', '.join(ENSEMBLE_STRATEGIES)}")
    k, fold = _get(c, "train.k_folds"), _get(c, "train.fold")
    if k < 1 or (fold is not None and not 0 <= fold < k):
        raise ConfigError(f"train.k_folds={k}, train.fold={fold}: k_folds must be >= 1 and fold in [0, k_folds)")
    if _get(c, "data.padding") not in PADDINGS:
        raise ConfigError(f"data.padding={_get(c, 'data.padding')} is invalid: choose one of {', '.join(PADDINGS)}")
    if _get(c, "model.dtype") not in DTYPES:
        raise ConfigError(f"model.dtype={_get(c, 'model.dtype')} is invalid: choose one of {', '.join(DTYPES)}")
    if _get(c, "model.attn_implementation") not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={_get(c, 'model.attn_implementation')} is invalid: "
                          f"choose null or one of {', '.join(a for a in ATTENTION_IMPLEMENTATIONS if a)}")
    for key, allowed in (("mode", MODES), ("tracking.name", TRACKERS), ("inference.quantization", INFERENCE_QUANTIZATIONS),
                         ("predict.split", ("test", "dev"))):
        if _get(c, key) not in allowed:
            raise ConfigError(f"{key}={_get(c, key)} is invalid: choose one of {', '.join(allowed)}")
    _positive("inference.batch_size", _get(c, "inference.batch_size"))
    if _get(c, "objective") not in OBJECTIVES:
        raise ConfigError(f"objective={_get(c, 'objective')} is invalid: choose one of {', '.join(OBJECTIVES)}")
    kind = _enum_name(_get(c, "model.kind"))
    if _get(c, "model.quantization") != "none":
        if kind != "causal":
            raise ConfigError("model.quantization (QLoRA) is for causal models only: set model.quantization=none")
        if not _get(c, "model.lora.enabled"):
            raise ConfigError("a quantized model trains only through LoRA: set model.lora.enabled=true")
    for key, needs_bnb in (("model.quantization", ("8bit", "4bit")),
                           ("inference.quantization", ("bnb_8bit", "bnb_4bit"))):
        if _get(c, key) in needs_bnb and not _installed("bitsandbytes"):
            raise ConfigError(f"{key}={_get(c, key)} needs bitsandbytes, which is not installed: "
                              f"pip install bitsandbytes, or set {key}=none")
    _check_device(c)
    if (_get(c, "mode") == "train" and kind != "api" and _get(c, "inference.quantization") != "none"
            and not _get(c, "train.save_model")):
        raise ConfigError(f"inference.quantization={_get(c, 'inference.quantization')} measures the saved weights "
                          f"after training: set train.save_model=true (a sweep trial saves none unless told)")
    if _get(c, "mode") == "predict" and kind != "api" and not _get(c, "model.path"):
        raise ConfigError("mode=predict summarises with a trained model: set model.path=<a training run's folder "
                          "(train.save_model=true) or a folder with config.json and *.safetensors>")
    if kind == "api":
        from summ.distributed import world_size
        from summ.solar import validate_config

        validate_config(_get(c, "solar"))
        if world_size() > 1:
            raise ConfigError(f"model={_get(c, 'model.name')} calls a paid, rate-limited API: run it as one process "
                              f"(python run.py ...), not under accelerate launch / torchrun")
    elif _get(c, "model.tiny") is None and not (_get(c, "model.path") or _get(c, "model.hub_id")):
        raise ConfigError(f"model '{_get(c, 'model.name')}' has no weights: set model.path=<local folder>")
    if _get(c, "data.source") in (DataSource.csv, "csv") and not _get(c, "data.dir"):
        raise ConfigError(f"data={_get(c, 'data.name')} reads CSVs from a folder: set data.dir=<folder with "
                          f"{_get(c, 'data.train_file')}, {_get(c, 'data.dev_file')}, {_get(c, 'data.test_file')}>")
    if "{dialogue}" not in _get(c, "model.prompt_template"):
        raise ConfigError("model.prompt_template must contain {dialogue}")
    resolve_batch(_get(c, "batch.batch_size"), _get(c, "batch.gradient_accumulation_steps"),
                  _get(c, "batch.effective_batch_size"), num_processes=1)


def _installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (bitsandbytes takes seconds)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _on_cpu(c: Any) -> bool:
    """Where the run will be: the CPU when train.cpu is set or no CUDA device is present.
    torch is asked only when a rule needs the answer."""
    if _get(c, "train.cpu"):
        return True
    import torch

    return not torch.cuda.is_available()


def _check_device(c: Any) -> None:
    """Settings that work on one kind of device only, refused before anything loads."""
    if _enum_name(_get(c, "train.mixed_precision")) == "fp16" and _on_cpu(c):
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU and this run is on the CPU "
                          "(train.cpu=true or no CUDA device): set train.mixed_precision=bf16 or no")
    if _get(c, "inference.quantization") == "dynamic_int8" and not _on_cpu(c):
        raise ConfigError("inference.quantization=dynamic_int8 runs on the CPU only and this run is on CUDA: "
                          "add train.cpu=true, or set inference.quantization=bnb_8bit, bnb_4bit or none")


def _get(c: Any, dotted: str) -> Any:
    if isinstance(c, DictConfig):
        return OmegaConf.select(c, dotted)
    for part in dotted.split("."):
        c = getattr(c, part)
    return c


def _enum_name(v: Any) -> str:
    return v.name if isinstance(v, enum.Enum) else str(v)


def resolve_batch(batch_size: int, gradient_accumulation_steps: int,
                  effective_batch_size: Optional[int], num_processes: int) -> tuple[int, int, int]:
    """The one place that turns batch settings into (micro-batch, accumulation, effective batch).

    The effective batch is the samples behind one optimizer step, over all processes.
    """
    if effective_batch_size is None:
        ga = gradient_accumulation_steps
    else:
        per_update = batch_size * num_processes
        if effective_batch_size % per_update:
            raise ConfigError(
                f"batch.effective_batch_size={effective_batch_size} is not a multiple of "
                f"batch.batch_size x processes = {batch_size} x {num_processes}: change one of them")
        ga = effective_batch_size // per_update
    return batch_size, ga, batch_size * ga * num_processes
