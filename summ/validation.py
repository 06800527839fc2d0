"""Value rules that a type cannot express (a batch size of 0, an effective batch that does not
divide, a setting this device cannot run), checked right after composition, before any compute.
Each refusal is one ConfigError line naming the key to change."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Iterator
from pathlib import Path
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
            raise ConfigError(
                f"{prefix}{key} is not a setting (a typo?): remove it; python run.py --cfg job lists every setting"
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def _refuse_non_finite(node: Any, prefix: str = "") -> None:
    """NaN and infinities pass every "> 0" check (a NaN learning rate failed in the optimizer, an
    infinite one trained to `diverged`): no setting of summ takes them."""
    items = (
        ((k, node[k]) for k in node.keys() if not OmegaConf.is_missing(node, k))
        if isinstance(node, DictConfig)
        else ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    )
    for key, value in items:
        if key == "hydra" and not prefix:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key}={value} is not a number a run can use: give a finite value")
        if isinstance(value, DictConfig) or dataclasses.is_dataclass(value):
            _refuse_non_finite(value, f"{prefix}{key}.")


def bounds() -> list[tuple[str, float, bool]]:
    """(dotted key, lower bound, strict) of every field declared positive() or not_negative() in the
    schemas (summ/config.py), the strict (> 0) ones first."""
    return sorted(_declared(Config, ""), key=lambda bound: not bound[2])


def _declared(schema: type, prefix: str) -> Iterator[tuple[str, float, bool]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if "low" in f.metadata:
            yield prefix + f.name, f.metadata["low"], f.metadata["strict"]
        for inner in typing.get_args(hints[f.name]) or (hints[f.name],):  # Optional[X]: X
            if dataclasses.is_dataclass(inner):
                yield from _declared(inner, f"{prefix}{f.name}.")


def _at_least(c: Any) -> None:
    for key, low, strict in bounds():
        value = _get(c, key)
        if value is not None and (value < low or (strict and value == low)):
            raise ConfigError(f"{key}={value} is invalid: it must be {'>' if strict else '>='} {low:g}")


def validate(cfg: DictConfig | Config) -> None:
    """Value rules that types cannot express. Raises ConfigError with the key to change."""
    c: Any = cfg
    if isinstance(cfg, DictConfig):
        _refuse_unknown_keys(cfg)
    _refuse_non_finite(cfg)
    _at_least(c)
    _check_ranges(c)
    _check_model(c)
    _check_device(c)
    _check_data_and_mode(c)
    _check_contradictions(c)
    resolve_batch(
        _get(c, "batch.batch_size"),
        _get(c, "batch.gradient_accumulation_steps"),
        _get(c, "batch.effective_batch_size"),
        num_processes=1,
    )


def _check_ranges(c: Any) -> None:
    for key, low, high in (("data.quality_threshold", 0, 1), ("measure.headroom", 0, 1)):
        if not low <= _get(c, key) <= high or (key == "measure.headroom" and _get(c, key) == 0):
            raise ConfigError(f"{key}={_get(c, key)} must be in {'(' if key == 'measure.headroom' else '['}0, 1]")
    for key in ("train.warmup_ratio", "train.label_smoothing"):
        if _get(c, key) >= 1:
            raise ConfigError(f"{key}={_get(c, key)} must be below 1")
    for key, one_allowed in (("model.tiny.dropout", False), ("model.lora.dropout", False), ("solar.top_p", True)):
        value = _get(c, key)  # a dropout of 1 zeroes every output; a top_p of 1 turns nucleus sampling off
        if value is not None and not (0 <= value < 1 or (one_allowed and value == 1)):
            raise ConfigError(f"{key}={value} is a probability: it must be in [0, 1{']' if one_allowed else ')'}")
    if not 0 < _get(c, "inference.top_p") <= 1:
        raise ConfigError(
            f"inference.top_p={_get(c, 'inference.top_p')} is the nucleus' share of the probability: "
            f"it must be in (0, 1] (1 = off)"
        )
    if _get(c, "inference.do_sample") and _get(c, "inference.temperature") <= 0:
        raise ConfigError(
            f"inference.temperature={_get(c, 'inference.temperature')} with inference.do_sample=true: "
            f"sampling needs a temperature > 0; for the most likely summary use inference=greedy"
        )
    if _get(c, "data.source") == DataSource.synthetic:
        for key in ("data.synthetic_train_size", "data.synthetic_eval_size"):
            if _get(c, key) < 1:
                raise ConfigError(f"{key}={_get(c, key)} is invalid: data=synthetic needs at least 1 sample")
    if _get(c, "knee.tolerance") >= 1:
        raise ConfigError(
            f"knee.tolerance={_get(c, 'knee.tolerance')} is a fraction of the best samples/s: "
            f"it must be in [0, 1) (0.05 = within 5%)"
        )
    for key, least in (("data.encoder_max_len", 8), ("data.decoder_max_len", 4)):
        if _get(c, key) < least:
            raise ConfigError(
                f"{key}={_get(c, key)} is too short to hold the special tokens and any text: it must be >= {least}"
            )
    k, fold = _get(c, "train.k_folds"), _get(c, "train.fold")
    if fold is not None and not 0 <= fold < k:
        raise ConfigError(f"train.k_folds={k}, train.fold={fold}: fold must be in [0, k_folds)")
    if "{dialogue}" not in _get(c, "model.prompt_template"):
        raise ConfigError("model.prompt_template must contain {dialogue}")
    check_reuse_from(_get(c, "sweep.reuse_from"))
    url = str(_get(c, "solar.base_url"))
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"solar.base_url={url} is not an http(s) URL: set it like https://api.upstage.ai/v1")


def check_reuse_from(reuse_from: Any) -> None:
    """sweep.reuse_from names a finished sweep: a folder that holds job folders (0/, 1/, ...)."""
    if not reuse_from:
        return
    from summ.run_folder import job_dirs

    folder = os.path.expanduser(str(reuse_from))
    if not os.path.isdir(folder):
        raise ConfigError(f"sweep.reuse_from={reuse_from} is not a folder: give a finished sweep's folder")
    if not job_dirs(Path(folder)):
        raise ConfigError(
            f"sweep.reuse_from={reuse_from} holds no job folders (0/, 1/, ...): give a finished "
            f"sweep's folder (outputs/multirun/<date_time>), not a run's"
        )


def _check_model(c: Any) -> None:
    kind = _get(c, "model.kind")
    if _get(c, "model.quantization") != "none":
        if kind != ModelKind.causal:
            raise ConfigError("model.quantization (QLoRA) is for causal models only: set model.quantization=none")
        if not _get(c, "model.lora.enabled"):
            raise ConfigError("a quantized model trains only through LoRA: set model.lora.enabled=true")
    for key, needs_bnb in (
        ("model.quantization", ("8bit", "4bit")),
        ("inference.quantization", ("bnb_8bit", "bnb_4bit")),
    ):
        if _get(c, key) in needs_bnb and not _installed("bitsandbytes"):
            raise ConfigError(
                f"{key}={_get(c, key)} needs bitsandbytes, which is not installed: "
                f"pip install bitsandbytes, or set {key}=none"
            )
    if (
        _get(c, "ensemble.strategy") == "stacking"
        and _get(c, "train.k_folds") > 1
        and _get(c, "inference.num_beams") < 2
        and not _get(c, "inference.do_sample")
    ):
        raise ConfigError(
            "ensemble.strategy=stacking learns from several candidates per dialogue: set inference.num_beams >= 2"
        )
    if kind == ModelKind.api:
        from summ.distributed import world_size

        if world_size() > 1:
            raise ConfigError(
                f"model={_get(c, 'model.name')} calls a paid, rate-limited API: run it as one process "
                f"(python run.py ...), not under accelerate launch / torchrun"
            )
    elif _get(c, "model.tiny") is None and not (_get(c, "model.path") or _get(c, "model.hub_id")):
        raise ConfigError(f"model '{_get(c, 'model.name')}' has no weights: set model.path=<local folder>")
    tiny = _get(c, "model.tiny")
    if tiny is not None:
        d, heads, kv = _get(c, "model.tiny.d_model"), _get(c, "model.tiny.heads"), _get(c, "model.tiny.kv_heads")
        for key, value in (
            ("model.tiny.d_model", d),
            ("model.tiny.heads", heads),
            ("model.tiny.layers", _get(c, "model.tiny.layers")),
            ("model.tiny.ffn_dim", _get(c, "model.tiny.ffn_dim")),
        ):
            if value < 1:
                raise ConfigError(f"{key}={value} is invalid: it must be >= 1")
        if d % heads:
            raise ConfigError(
                f"model.tiny.d_model={d} is not a multiple of model.tiny.heads={heads}: each head takes "
                f"an equal share of the width; change one of them"
            )
        if _get(c, "model.tiny.arch") == "llama" and (kv < 1 or heads % kv):
            raise ConfigError(
                f"model.tiny.heads={heads} is not a multiple of model.tiny.kv_heads={kv} (grouped-query "
                f"attention shares each key/value head among equal groups): change one of them"
            )
    if tiny is not None:  # a real model's limit is in its config.json, read at load
        enc, dec = _get(c, "data.encoder_max_len"), _get(c, "data.decoder_max_len")
        limit = _get(c, "model.tiny.max_positions")
        if (enc + dec if kind == ModelKind.causal else max(enc, dec)) > limit:  # causal: prompt and summary share them
            raise ConfigError(
                f"data.encoder_max_len={enc} and data.decoder_max_len={dec} do not fit the model's "
                f"{limit} positions (model.tiny.max_positions): lower them"
            )


def _check_data_and_mode(c: Any) -> None:
    kind = _get(c, "model.kind")
    if (
        _get(c, "mode") == "train"
        and kind != ModelKind.api
        and _get(c, "inference.quantization") != "none"
        and not _get(c, "train.save_model")
    ):
        raise ConfigError(
            f"inference.quantization={_get(c, 'inference.quantization')} measures the saved weights "
            f"after training: set train.save_model=true (a sweep trial saves none unless told)"
        )
    if _get(c, "mode") == "predict" and kind != ModelKind.api and not _get(c, "model.path"):
        raise ConfigError(
            "mode=predict summarises with a trained model: set model.path=<a training run's folder "
            "(train.save_model=true) or a folder with config.json and *.safetensors>"
        )
    if _get(c, "data.source") == DataSource.csv and not _get(c, "data.dir"):
        raise ConfigError(
            f"data={_get(c, 'data.name')} reads CSVs from a folder: set data.dir=<folder with "
            f"{_get(c, 'data.train_file')}, {_get(c, 'data.dev_file')}, {_get(c, 'data.test_file')}>"
        )


def _check_contradictions(c: Any) -> None:
    """Settings that say two different things: refused where one would silently win."""
    if _get(c, "measure.steps") is not None and _get(c, "measure.samples") is not None:
        raise ConfigError(
            f"measure.steps={_get(c, 'measure.steps')} and measure.samples={_get(c, 'measure.samples')} "
            f"both set the measured window: keep one (a sweep's cells compare in samples)"
        )
    if _get(c, "batch.max_tokens") is not None and _get(c, "batch.effective_batch_size") is not None:
        raise ConfigError(
            f"batch.max_tokens={_get(c, 'batch.max_tokens')} fills micro-batches by positions, so their samples "
            f"vary and batch.effective_batch_size={_get(c, 'batch.effective_batch_size')} cannot be kept: "
            f"set batch.gradient_accumulation_steps instead, or batch.max_tokens=null"
        )
    if _get(c, "model.attn_implementation") == "sdpa_varlen" and _get(c, "train.compile"):
        raise ConfigError(
            "model.attn_implementation=sdpa_varlen attends a packed row sample by sample in a Python loop, which "
            "torch.compile would recompile for every new row layout: set model.attn_implementation=sdpa "
            "(flash_attention_2 on a GPU), or train.compile=false"
        )
    if _get(c, "data.packing"):
        if str(_get(c, "model.kind")) != "causal":
            raise ConfigError(
                f"data.packing=true packs causal LMs only, and model.kind={_get(c, 'model.kind')}: an encoder-decoder "
                '(BART) takes no position_ids, so samples in one row would attend to each other (README, "Packing")'
            )
        if str(_get(c, "data.padding")) == "max_length":
            raise ConfigError(
                "data.packing=true and data.padding=max_length: packed rows have no padding to fix; keep one"
            )
    if _get(c, "mode") == "predict" and (k_folds := _get(c, "train.k_folds")) > 1:
        raise ConfigError(
            f"train.k_folds={k_folds} with mode=predict: predict uses one trained model; "
            f"point model.path at one member (<run>/fold_<k>), or ensemble them with summ-ensemble"
        )


def unused_settings(c: Any) -> list[str]:
    """Settings this run will not act on, though accepted (a sweep may vary them to zero): each
    becomes a warning line, so nothing is dropped without a word."""
    said = []
    if _get(c, "augmentation.methods") and not _get(c, "augmentation.ratio"):
        said.append(
            f"augmentation {'+'.join(map(str, _get(c, 'augmentation.methods')))} adds nothing: "
            f"augmentation.ratio=0 (samples per training sample per method)"
        )
    if str(_get(c, "train.compile_mode")) != "default" and not _get(c, "train.compile"):
        said.append(f"train.compile_mode={_get(c, 'train.compile_mode')} is torch.compile's, and train.compile=false")
    if _get(c, "model.attn_implementation") == "sdpa_varlen" and not _get(c, "data.packing"):
        said.append(
            "model.attn_implementation=sdpa_varlen attends packed rows sample by sample, "
            "and data.packing=false: it runs as sdpa"
        )
    if _get(c, "data.max_packed_len") is not None and not _get(c, "data.packing"):
        said.append(f"data.max_packed_len={_get(c, 'data.max_packed_len')} caps packed rows, and data.packing=false")
    if _get(c, "data.group_by_length") and _get(c, "batch.max_tokens") is not None:
        said.append("data.group_by_length=true: batch.max_tokens already cuts micro-batches from length-sorted buckets")
    elif _get(c, "data.group_by_length") and _get(c, "batch.batch_size") == 1:
        said.append(
            "data.group_by_length=true groups samples of like length into a batch, and a micro-batch of 1 "
            "has no padding to save: it changes nothing here"
        )
    if _get(c, "tta.methods") and (not _get(c, "eval.enabled") or not _get(c, "eval.generate")):
        said.append(
            f"tta {'+'.join(map(str, _get(c, 'tta.methods')))} runs at evaluation, and this run generates "
            f"no summaries (eval.enabled or eval.generate is false): set them true, or tta=none"
        )
    return said


def _installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (bitsandbytes takes seconds)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _cxx_compiler() -> bool:
    """Whether inductor finds a C++ compiler (the CXX variable, else c++, g++, clang++ on PATH)."""
    import shutil

    return any(shutil.which(n) for n in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))


def _on_cpu(c: Any) -> bool:
    """Where the run will be: the CPU when train.cpu is set or no CUDA device is present.
    torch is asked only when a rule needs the answer."""
    if _get(c, "train.cpu"):
        return True
    import torch

    return not torch.cuda.is_available()


def _check_device(c: Any) -> None:
    """Settings that work on one kind of device only, refused before anything loads."""
    if (
        _get(c, "train.mixed_precision") == "fp16"
        and _get(c, "model.dtype") == "float16"
        and not _get(c, "model.lora.enabled")
        and _get(c, "model.tiny") is None
    ):
        raise ConfigError(
            "train.mixed_precision=fp16 scales float32 gradients, and a full fine-tune of a "
            "model.dtype=float16 model has float16 ones, which the gradient scaler cannot unscale: "
            "set model.dtype=float32 (fp16 autocast still computes in half precision), or "
            "train.mixed_precision=bf16 with model.dtype=bfloat16, or model.lora.enabled=true"
        )
    if _get(c, "train.compile") and _on_cpu(c) and not _cxx_compiler():
        raise ConfigError(
            "train.compile=true on the CPU needs a C++ compiler (inductor builds its CPU kernels with one): "
            "install g++ (or point the CXX variable at one), or set train.compile=false"
        )
    if _get(c, "train.mixed_precision") == "fp16" and _on_cpu(c):
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU and this run is on the CPU "
            "(train.cpu=true or no CUDA device): set train.mixed_precision=bf16 or no"
        )
    if _get(c, "model.attn_implementation") == "flash_attention_2":
        if _on_cpu(c):
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only and this run is on "
                "the CPU: set model.attn_implementation=sdpa (or eager)"
            )
        if not _installed("flash_attn"):
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                "installed: pip install flash-attn --no-build-isolation, or set "
                "model.attn_implementation=sdpa"
            )
    if _get(c, "model.attn_implementation") == "flex_attention" and _get(c, "mode") == "train" and _on_cpu(c):
        raise ConfigError(  # torch 2.13 raises NotImplementedError at the first backward
            "model.attn_implementation=flex_attention has no backward pass on the CPU (torch's FlexAttention), "
            "so it cannot train here: set model.attn_implementation=sdpa (or eager), or train on a CUDA GPU"
        )
    if _get(c, "inference.quantization") == "dynamic_int8" and not _on_cpu(c):
        raise ConfigError(
            "inference.quantization=dynamic_int8 runs on the CPU only and this run is on CUDA: "
            "add train.cpu=true, or set inference.quantization=bnb_8bit, bnb_4bit or none"
        )


def _get(c: Any, dotted: str) -> Any:
    if isinstance(c, DictConfig):
        return OmegaConf.select(c, dotted)
    for part in dotted.split("."):
        c = getattr(c, part)
    return c
