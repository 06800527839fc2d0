"""Hardening: settings that cannot work on this device or install stop in validate() before any
model loads; weights load only from safetensors; a result file that cannot be written fails
with one line and leaves the old file whole. Every user-caused error ends the CLI with exit 2."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from summ.errors import ConfigError, UserError, WeightsNotFound
from summ.files import WriteFailed, atomic_write_json, atomic_write_text
from summ.modeling import models
from summ.validation import validate

from .conftest import CONF, assert_one_error_line, cli, compose_cfg


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


# --------------------------------------------------------------------------- atomic writes that fail


def test_a_folder_that_cannot_exist_is_one_line_naming_the_file_and_why(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be\n")
    for target in (blocker / "metrics.json", blocker / "run" / "metrics.json"):
        with pytest.raises(WriteFailed) as info:
            atomic_write_json(target, {"status": "ok"})
        message = str(info.value)
        assert "\n" not in message
        assert str(target) in message and f"{blocker} is a file, not a folder" in message
        assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
    assert blocker.read_text() == "a file where a folder should be\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_a_refused_rename_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"status": "ok", "samples_per_s": 10.0})
    before = target.read_bytes()

    def refuse(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteFailed, match=r"cannot write .*metrics\.json: Input/output error$") as info:
        atomic_write_json(target, {"status": "failed"})
    assert "\n" not in str(info.value)
    assert target.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_a_full_disk_mid_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "sweep.csv"
    atomic_write_text(target, "job,status\n0,ok\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed, match="No space left on device"):
        atomic_write_text(target, "job,status\n0,ok\n1,ok\n")
    assert target.read_text() == "job,status\n0,ok\n"
    assert _tmp_files(tmp_path) == []


def test_a_value_json_cannot_hold_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"status": "ok", "nan_becomes_null": float("nan")})
    before = target.read_bytes()
    with pytest.raises(TypeError, match="metrics.json"):
        atomic_write_json(target, {"status": "ok", "device": torch.device("cpu")})
    assert target.read_bytes() == before and json.loads(before)["nan_becomes_null"] is None
    assert _tmp_files(tmp_path) == []


# --------------------------------------------------------------------------- cross-field rules in validate()


@pytest.fixture
def cuda(monkeypatch):
    """Whether torch sees a CUDA device, as validate() asks it (the rules need both answers)."""

    def _set(available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    return _set


@pytest.mark.parametrize("cuda_available", [True, False])
def test_fp16_is_refused_on_the_cpu_only(cuda, cuda_available):
    cuda(cuda_available)
    with pytest.raises(ConfigError, match=r"train\.mixed_precision=fp16 .* set train\.mixed_precision=bf16"):
        validate(compose_cfg(["train.mixed_precision=fp16", "train.cpu=true"]))
    cfg = compose_cfg(["train.mixed_precision=fp16"])
    if cuda_available:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=r"train\.mixed_precision=fp16"):
            validate(cfg)
    validate(compose_cfg(["train.mixed_precision=bf16", "train.cpu=true"]))


def test_fp16_autocast_over_a_float16_full_fine_tune_is_refused(cuda):
    """The gradient scaler unscales float32 gradients only: a float16 model trained in full would
    fail at its first step ("Attempting to unscale FP16 gradients"), on a GPU, after the load."""
    cuda(True)
    real = ["model=kobart", "model.path=/models/kobart", "train.mixed_precision=fp16"]
    with pytest.raises(ConfigError, match=r"model\.dtype=float16 .* set model\.dtype=float32"):
        validate(compose_cfg(real + ["model.dtype=float16"]))
    validate(compose_cfg(real + ["model.dtype=float32"]))
    validate(
        compose_cfg(
            [
                "model=llama",
                "model.path=/models/llama",
                "train.mixed_precision=fp16",
                "model.dtype=float16",
                "model.quantization=none",
            ]
        )
    )  # LoRA: its adapters are float32


@pytest.mark.parametrize("cuda_available", [True, False])
def test_flash_attention_2_is_refused_where_it_cannot_run(cuda, cuda_available, monkeypatch):
    """On the CPU, or without the flash-attn package: one line before loading, not an ImportError
    from inside transformers after it."""
    import importlib.util

    cuda(cuda_available)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else object())
    says = "runs on CUDA GPUs only" if not cuda_available else "needs the flash-attn package"
    with pytest.raises(ConfigError, match=f"model.attn_implementation=flash_attention_2 {says}"):
        validate(compose_cfg(["model.attn_implementation=flash_attention_2"]))
    validate(compose_cfg(["model.attn_implementation=sdpa"]))


def test_flex_attention_is_refused_for_training_on_the_cpu(cuda):
    """torch's FlexAttention has no CPU backward: the first step would fail after the model loaded."""
    cuda(False)
    with pytest.raises(ConfigError, match="model.attn_implementation=flex_attention has no backward pass on the CPU"):
        validate(compose_cfg(["model=tiny_llama", "model.attn_implementation=flex_attention"]))
    cuda(True)
    validate(compose_cfg(["model=tiny_llama", "model.attn_implementation=flex_attention"]))


@pytest.mark.parametrize("model,attention", [("tiny_bart", "eager"), ("tiny_llama", "eager"), ("tiny_llama", "sdpa")])
def test_the_tiny_models_use_the_attention_asked_for(model, attention):
    """model.attn_implementation was ignored for the tiny models (built from a config object)."""
    from omegaconf import OmegaConf

    from summ.modeling import models

    c = OmegaConf.to_object(compose_cfg([f"model={model}", f"model.attn_implementation={attention}"]))
    tok = models.load_tokenizer(c.model)
    assert models.load(c.model, tok, 0, torch.device("cpu")).model.config._attn_implementation == attention


@pytest.mark.parametrize("cuda_available", [True, False])
def test_dynamic_int8_is_refused_on_cuda_only(cuda, cuda_available):
    cuda(cuda_available)
    validate(compose_cfg(["inference.quantization=dynamic_int8", "train.cpu=true"]))
    cfg = compose_cfg(["inference.quantization=dynamic_int8"])
    if cuda_available:
        with pytest.raises(ConfigError, match=r"inference\.quantization=dynamic_int8 .* add train\.cpu=true"):
            validate(cfg)
    else:
        validate(cfg)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model=tiny_llama", "model.quantization=4bit"], "model.quantization"),
        (["model=tiny_llama", "model.quantization=8bit"], "model.quantization"),
        (["inference.quantization=bnb_4bit"], "inference.quantization"),
    ],
)
def test_bitsandbytes_settings_need_it_installed(monkeypatch, overrides, key):
    cfg = compose_cfg(overrides)
    validate(cfg)  # installed here (a dependency of the package)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not: find_spec answers None
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}=\S+ needs bitsandbytes.* set {key}=none"):
        validate(cfg)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_no_model_runs_remote_code_by_default(option):
    assert compose_cfg([f"model={option}"]).model.trust_remote_code is False


# --------------------------------------------------------------------------- weights only from safetensors


def _tiny_bart(folder: Path, pickled: bool) -> Path:
    """The tiny BART of model=tiny_bart with its tokenizer, saved as a real checkpoint folder:
    safetensors (save_pretrained), or only a pickled pytorch_model.bin as older checkpoints ship."""
    model_cfg = OmegaConf.to_object(compose_cfg(["model=tiny_bart"]).model)
    tok = models.tiny_tokenizer()
    model = models.tiny_model(model_cfg, tok, seed=0)
    tok.save_pretrained(folder)
    if pickled:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bin_only(tmp_path_factory) -> Path:
    return _tiny_bart(tmp_path_factory.mktemp("bin_only"), pickled=True)


def _kobart_at(path: Path):
    return OmegaConf.to_object(compose_cfg(["model=kobart", f"model.path={path}"]).model)


def test_a_pickled_checkpoint_is_refused_with_one_line(bin_only):
    cfg = _kobart_at(bin_only)
    with pytest.raises(WeightsNotFound) as info:
        models.load(cfg, models.tiny_tokenizer(), seed=0, device=torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert f"model.path={bin_only} has only pytorch_model.bin" in message and "safetensors" in message
    with pytest.raises(WeightsNotFound, match="only pytorch_model.bin"):  # before the tokenizer, too
        models.load_tokenizer(cfg)


def test_a_stray_safetensors_file_does_not_open_the_pickle(tmp_path, bin_only):
    """from_pretrained without use_safetensors=True would load pytorch_model.bin here."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in bin_only.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(1)}, folder / "extra.safetensors")
    with pytest.raises(WeightsNotFound, match=rf"model\.path={folder}: no loadable safetensors weights"):
        models.load(_kobart_at(folder), models.tiny_tokenizer(), seed=0, device=torch.device("cpu"))


def test_a_safetensors_checkpoint_loads_its_own_weights(tmp_path):
    folder = _tiny_bart(tmp_path / "safe", pickled=False)
    cfg = _kobart_at(folder)
    tok = models.load_tokenizer(cfg)
    loaded = models.load(cfg, tok, seed=1, device=torch.device("cpu"))
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    name = "model.encoder.layers.0.fc1.weight"
    assert torch.equal(loaded.model.state_dict()[name], saved[name])


# --------------------------------------------------------------------------- the CLI: one line, exit 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,expect,before_setup",
    [
        (["train.mixed_precision=fp16", "train.cpu=true"], "train.mixed_precision=fp16 needs a CUDA GPU", True),
        (["model=tiny_bart", "model.quantization=4bit"], "model.quantization (QLoRA) is for causal models only", True),
        (
            ["batch.batch_size=4", "batch.effective_batch_size=30"],
            "batch.effective_batch_size=30 is not a multiple",
            True,
        ),
        (["model=kobart", "model.path={bin_only}"], "model.path={bin_only} has only pytorch_model.bin", False),
        pytest.param(
            ["inference.quantization=dynamic_int8"],
            "inference.quantization=dynamic_int8 runs on the CPU only",
            True,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA-only refusal"),
        ),
    ],
    ids=["fp16_on_cpu", "4bit_seq2seq", "effective_batch", "bin_only_weights", "dynamic_int8_on_cuda"],
)
def test_user_errors_end_in_one_line_and_exit_2(tmp_path, bin_only, overrides, expect, before_setup):
    run_dir = tmp_path / "run"
    args = [o.format(bin_only=bin_only) for o in overrides]
    start = time.monotonic()
    proc = cli(*args, f"hydra.run.dir={run_dir}", timeout=120)
    seconds = time.monotonic() - start
    assert_one_error_line(proc, expect.format(bin_only=bin_only), 2)
    assert seconds < 60
    metrics = json.loads((run_dir / "metrics.json").read_text())  # whatever happened, it says why
    assert metrics["status"] == "failed" and expect.format(bin_only=bin_only) in metrics["error"]
    if before_setup:  # validate() refused it: nothing was measured
        assert metrics.get("train") is None


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [False, True])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, multirun):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = (
        ["-m", f"hydra.sweep.dir={blocker}/sweep", "batch.batch_size=2"]
        if multirun
        else [f"hydra.run.dir={blocker}/run"]
    )
    assert_one_error_line(cli(*args, timeout=120), f"{blocker} is a file, not a folder", 2)


@pytest.mark.slow
def test_a_sweep_cell_refused_by_validation_says_why_in_its_folder(tmp_path):
    cli(
        "-m", "batch.batch_size=0,2", f"hydra.sweep.dir={tmp_path}", "measure.steps=1", "measure.warmup_steps=1", code=0
    )
    import json

    refused = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert refused["status"] == "failed" and "batch.batch_size=0" in refused["error"]
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["status"] == "ok"
    assert "failed" in (tmp_path / "knee_report.md").read_text()


def test_a_stop_asked_for_during_a_periodic_checkpoint_is_acted_on_after_it():
    """SIGTERM while a periodic checkpoint is written waits for the save, then reaches the stop
    request (the loop saves again and stops at the end of the next step); during the stop's own
    save a further signal is dropped: the stop is under way."""
    import signal

    from summ.training import checkpoint

    for deliver, expect in ((True, signal.SIGTERM), (False, None)):
        stop = checkpoint.StopRequest()
        with stop.installed():
            with checkpoint.signals_deferred(deliver_after=deliver):
                signal.raise_signal(signal.SIGTERM)
                assert stop.signum is None  # not yet: the save finishes first
        assert stop.signum == expect
