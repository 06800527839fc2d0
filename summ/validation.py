"""Value rules that a type cannot express (a batch size of 0, an effective batch that does not
divide, a setting this device cannot run), checked right after composition, before any compute.
Each refusal is one ConfigError line naming the key to change."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from summ.config import Config, DataSource, ModelKind, resolve_batch
from summ.errors import ConfigError


def _refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """A key its schema does not have, added with Hydra's `+` (which opens the struct for it):
    `+batch.batchsize=16` would otherwise run at the default micro-batch without a word."""
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


def _refuse_non_finite(node: Any, prefix: str = "") -> None:
    """NaN and infinities pass every "> 0" check (a NaN learning rate failed in the optimizer, an
    infinite one trained to `diverged`): no setting of summ takes them."""
    items = (((k, node[k]) for k in node.keys() if not OmegaConf.is_missing(node, k)) if isinstance(node, DictConfig)
             else ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node)))
    for key, value in items:
        if key == "hydra" and not prefix:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key}={value} is not a number a run can use: give a finite value")
        if isinstance(value, DictConfig) or dataclasses.is_dataclass(value):
            _refuse_non_finite(value, f"{prefix}{key}.")


def _at_least(c: Any, keys: tuple[str, ...], low: float, strict: bool) -> None:
    for key in keys:
        value = _get(c, key)
        if value is not None and (value < low or (strict and value == low)):
            raise ConfigError(f"{key}={value} is invalid: it must be {'>' if strict else '>='} {low:g}")


POSITIVE = ("batch.batch_size", "batch.gradient_accumulation_steps", "batch.eval_batch_size",
            "batch.effective_batch_size", "data.max_train_samples", "data.max_eval_samples", "train.epochs",
            "train.max_steps", "train.learning_rate", "train.total_samples", "measure.steps", "measure.samples",
            "measure.memory_budget_gb", "measure.peak_tflops", "measure.collective_timeout_s",
            "sweep.trial_collective_timeout_s", "inference.num_beams", "inference.max_new_tokens",
            "inference.batch_size", "measure.rss_interval_ms", "train.log_every_steps", "model.lora.r",
            "sweep.trial_samples", "tracking.log_every_steps", "train.save_every_steps", "train.keep_checkpoints",
            "train.k_folds", "solar.requests_per_minute", "solar.timeout_s", "solar.concurrency", "solar.max_tokens")
NOT_NEGATIVE = ("sweep.trial_warmup_samples", "measure.warmup_steps", "measure.warmup_samples", "train.weight_decay", "train.max_grad_norm",
                "train.label_smoothing", "train.warmup_ratio", "augmentation.ratio", "tta.num_aug",
                "train.adam_epsilon", "knee.tolerance", "data.num_workers", "solar.num_examples", "solar.max_retries",
                "solar.backoff_s", "solar.max_backoff_s")


def validate(cfg: DictConfig | Config) -> None:
    """Value rules that types cannot express. Raises ConfigError with the key to change."""
    c: Any = cfg
    if isinstance(cfg, DictConfig):
        _refuse_unknown_keys(cfg)
    _refuse_non_finite(cfg)
    _at_least(c, POSITIVE, 0, strict=True)
    _at_least(c, NOT_NEGATIVE, 0, strict=False)
    _check_ranges(c)
    _check_model(c)
    _check_device(c)
    _check_data_and_mode(c)
    resolve_batch(_get(c, "batch.batch_size"), _get(c, "batch.gradient_accumulation_steps"),
                  _get(c, "batch.effective_batch_size"), num_processes=1)


def _check_ranges(c: Any) -> None:
    for key, low, high in (("data.quality_threshold", 0, 1), ("measure.headroom", 0, 1)):
        if not low <= _get(c, key) <= high or (key == "measure.headroom" and _get(c, key) == 0):
            raise ConfigError(f"{key}={_get(c, key)} must be in {'(' if key == 'measure.headroom' else '['}0, 1]")
    for key in ("train.warmup_ratio", "train.label_smoothing"):
        if _get(c, key) >= 1:
            raise ConfigError(f"{key}={_get(c, key)} must be below 1")
    if _get(c, "knee.tolerance") >= 1:
        raise ConfigError(f"knee.tolerance={_get(c, 'knee.tolerance')} is a fraction of the best samples/s: "
                          f"it must be in [0, 1) (0.05 = within 5%)")
    for key, least in (("data.encoder_max_len", 8), ("data.decoder_max_len", 4)):
        if _get(c, key) < least:
            raise ConfigError(f"{key}={_get(c, key)} is too short to hold the special tokens and any text: "
                              f"it must be >= {least}")
    k, fold = _get(c, "train.k_folds"), _get(c, "train.fold")
    if fold is not None and not 0 <= fold < k:
        raise ConfigError(f"train.k_folds={k}, train.fold={fold}: fold must be in [0, k_folds)")
    if "{dialogue}" not in _get(c, "model.prompt_template"):
        raise ConfigError("model.prompt_template must contain {dialogue}")
    reuse_from = _get(c, "sweep.reuse_from")
    if reuse_from and not os.path.isdir(os.path.expanduser(str(reuse_from))):
        raise ConfigError(f"sweep.reuse_from={reuse_from} is not a folder: give a finished sweep's folder")
    url = str(_get(c, "solar.base_url"))
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"solar.base_url={url} is not an http(s) URL: set it like https://api.upstage.ai/v1")


def _check_model(c: Any) -> None:
    kind = _get(c, "model.kind")
    if _get(c, "model.quantization") != "none":
        if kind != ModelKind.causal:
            raise ConfigError("model.quantization (QLoRA) is for causal models only: set model.quantization=none")
        if not _get(c, "model.lora.enabled"):
            raise ConfigError("a quantized model trains only through LoRA: set model.lora.enabled=true")
    for key, needs_bnb in (("model.quantization", ("8bit", "4bit")), ("inference.quantization", ("bnb_8bit", "bnb_4bit"))):
        if _get(c, key) in needs_bnb and not _installed("bitsandbytes"):
            raise ConfigError(f"{key}={_get(c, key)} needs bitsandbytes, which is not installed: "
                              f"pip install bitsandbytes, or set {key}=none")
    if (_get(c, "ensemble.strategy") == "stacking" and _get(c, "train.k_folds") > 1
            and _get(c, "inference.num_beams") < 2 and not _get(c, "inference.do_sample")):
        raise ConfigError("ensemble.strategy=stacking learns from several candidates per dialogue: "
                          "set inference.num_beams >= 2")
    if kind == ModelKind.api:
        from summ.distributed import world_size

        if world_size() > 1:
            raise ConfigError(f"model={_get(c, 'model.name')} calls a paid, rate-limited API: run it as one process "
                              f"(python run.py ...), not under accelerate launch / torchrun")
    elif _get(c, "model.tiny") is None and not (_get(c, "model.path") or _get(c, "model.hub_id")):
        raise ConfigError(f"model '{_get(c, 'model.name')}' has no weights: set model.path=<local folder>")
    if _get(c, "model.tiny") is not None:  # a real model's limit is in its config.json, read at load
        enc, dec, limit = _get(c, "data.encoder_max_len"), _get(c, "data.decoder_max_len"), _get(c, "model.tiny.max_positions")
        if (enc + dec if kind == ModelKind.causal else max(enc, dec)) > limit:  # causal: prompt and summary share them
            raise ConfigError(f"data.encoder_max_len={enc} and data.decoder_max_len={dec} do not fit the model's "
                              f"{limit} positions (model.tiny.max_positions): lower them")


def _check_data_and_mode(c: Any) -> None:
    kind = _get(c, "model.kind")
    if (_get(c, "mode") == "train" and kind != ModelKind.api and _get(c, "inference.quantization") != "none"
            and not _get(c, "train.save_model")):
        raise ConfigError(f"inference.quantization={_get(c, 'inference.quantization')} measures the saved weights "
                          f"after training: set train.save_model=true (a sweep trial saves none unless told)")
    if _get(c, "mode") == "predict" and kind != ModelKind.api and not _get(c, "model.path"):
        raise ConfigError("mode=predict summarises with a trained model: set model.path=<a training run's folder "
                          "(train.save_model=true) or a folder with config.json and *.safetensors>")
    if _get(c, "data.source") == DataSource.csv and not _get(c, "data.dir"):
        raise ConfigError(f"data={_get(c, 'data.name')} reads CSVs from a folder: set data.dir=<folder with "
                          f"{_get(c, 'data.train_file')}, {_get(c, 'data.dev_file')}, {_get(c, 'data.test_file')}>")


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
    if (_get(c, "train.mixed_precision") == "fp16" and _get(c, "model.dtype") == "float16"
            and not _get(c, "model.lora.enabled") and _get(c, "model.tiny") is None):
        raise ConfigError("train.mixed_precision=fp16 scales float32 gradients, and a full fine-tune of a "
                          "model.dtype=float16 model has float16 ones, which the gradient scaler cannot unscale: "
                          "set model.dtype=float32 (fp16 autocast still computes in half precision), or "
                          "train.mixed_precision=bf16 with model.dtype=bfloat16, or model.lora.enabled=true")
    if _get(c, "train.mixed_precision") == "fp16" and _on_cpu(c):
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU and this run is on the CPU "
                          "(train.cpu=true or no CUDA device): set train.mixed_precision=bf16 or no")
    if _get(c, "model.attn_implementation") == "flash_attention_2":
        if _on_cpu(c):
            raise ConfigError("model.attn_implementation=flash_attention_2 runs on CUDA GPUs only and this run is on "
                              "the CPU: set model.attn_implementation=sdpa (or eager)")
        if not _installed("flash_attn"):
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                              "installed: pip install flash-attn --no-build-isolation, or set "
                              "model.attn_implementation=sdpa")
    if _get(c, "inference.quantization") == "dynamic_int8" and not _on_cpu(c):
        raise ConfigError("inference.quantization=dynamic_int8 runs on the CPU only and this run is on CUDA: "
                          "add train.cpu=true, or set inference.quantization=bnb_8bit, bnb_4bit or none")


def _get(c: Any, dotted: str) -> Any:
    if isinstance(c, DictConfig):
        return OmegaConf.select(c, dotted)
    for part in dotted.split("."):
        c = getattr(c, part)
    return c
