"""Inference: summaries from a trained run (or the Solar API) for the test set and the dev set,
with the generation speed measured and quantized generation compared against unquantized.

    python run.py mode=predict model.path=outputs/runs/<run>            # submission.csv + dev ROUGE
    python run.py mode=predict model.path=<run> inference.quantization=dynamic_int8
    python run.py -m preset=inference_speed model.path=<run>             # speed against ROUGE report

A training run saves what this needs in <run dir>/model (train.save_model, on by default): the
weights, or the LoRA adapter alone, the tokenizer, and the run's resolved config (summ_config.yaml),
so `model.path=<run dir>` brings back the model's kind, prompt and architecture by itself. A plain
folder with config.json and *.safetensors works too, with the model group chosen on the command line.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from summ import data as data_mod
from summ import evaluate, measure, models
from summ.config import Config, ModelConfig, ModelKind
from summ.errors import ConfigError, DataError, WeightsNotFound
from summ.io import atomic_write_text

log = logging.getLogger(__name__)

SAVED_CONFIG = "summ_config.yaml"  # a training run's resolved config, beside its saved weights
SUBMISSION_FILE = "submission.csv"


# --------------------------------------------------------------------------- saving (training side)


def save_for_predict(accelerator, model, tokenizer, cfg: Config, target: Path) -> None:
    """Weights (the LoRA adapter alone for peft models, safetensors), tokenizer and resolved config,
    all or nothing: written into a temporary folder beside `target`, renamed when complete. A full
    disk is one line (WriteFailed) and leaves no partial folder; an earlier `target` stays whole."""
    import shutil

    from summ.io import WriteFailed, make_folder

    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    make_folder(target.parent, for_file=target)
    try:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / SAVED_CONFIG, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if target.exists():
            target.replace(old)
        tmp.replace(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.replace(target)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) or "os error" in text or "No space left" in text:  # safetensors' own errors too
            raise WriteFailed(f"cannot write {target}: {getattr(exc, 'strerror', None) or text}") from exc
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- loading


@dataclass
class Trained:
    model_cfg: ModelConfig  # the architecture and prompt the weights were trained with
    weights_dir: Path
    adapter: bool  # a LoRA adapter over model_cfg's base weights
    seed: int  # builds a tiny model's random base exactly as training did


def locate(cfg: Config) -> Trained:
    """The trained model behind model.path: a run folder, its model/ folder, or plain weights."""
    path = Path(cfg.model.path).expanduser()
    for folder in (path / "model", path):
        if (folder / SAVED_CONFIG).is_file():
            return locate_folder(folder)
    if (path / "config.json").is_file():
        models._check_json(path / "config.json", "model.path")
        return Trained(copy.deepcopy(cfg.model), path, False, cfg.train.seed)
    if (path / "adapter_config.json").is_file():
        raise WeightsNotFound(f"model.path={cfg.model.path} holds a LoRA adapter without {SAVED_CONFIG}: point "
                              f"model.path at the training run's folder, which names the base model")
    raise WeightsNotFound(f"model.path={cfg.model.path} holds no trained model: give a training run's folder "
                          f"(saved with train.save_model=true) or a folder with config.json and *.safetensors")


def locate_folder(folder: Path) -> Trained:
    """A folder written by save_for_predict."""
    try:
        run_cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(folder / SAVED_CONFIG))
    except Exception as exc:  # a damaged or foreign file: YAML or schema errors
        raise WeightsNotFound(f"{folder / SAVED_CONFIG} is unreadable ({str(exc).splitlines()[0]}): point "
                              f"model.path at an intact training run") from None
    if (folder / "config.json").is_file():
        models._check_json(folder / "config.json", "model.path")
    model_cfg: ModelConfig = OmegaConf.to_object(run_cfg.model)
    adapter = (folder / "adapter_config.json").is_file()
    weights = "adapter_model.safetensors" if adapter else "*.safetensors"
    if not list(folder.glob(weights)):
        raise WeightsNotFound(f"{folder} has no {weights}: weights load only from safetensors; re-save them "
                              f"with save_pretrained(safe_serialization=True)")
    return Trained(model_cfg, folder, adapter, int(run_cfg.train.seed))


def load_for_inference(trained: Trained, tok, device: torch.device, quantization: str):
    """The trained model in eval mode, quantized as asked. Weights only from safetensors."""
    mc = trained.model_cfg  # (dynamic_int8 on CUDA is refused by config.validate)
    quant = models.bitsandbytes_config(quantization[4:], "inference.quantization") \
        if quantization.startswith("bnb_") else None
    if trained.adapter:  # the base the adapter was trained on
        base_cfg = copy.deepcopy(mc)
        base_cfg.lora.enabled, base_cfg.quantization = False, "none"
        source = models._tiny_weights_dir(base_cfg, tok, trained.seed) if mc.tiny else models._weights_source(base_cfg)
    else:
        source = str(trained.weights_dir)
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True, trust_remote_code=mc.trust_remote_code,
                                  dtype=models._dtype(mc.dtype))
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    auto = models._auto_class(mc.kind)
    try:
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsNotFound(f"{source} has no safetensors weights ({str(exc).splitlines()[0]}): "
                              f"re-save them with save_pretrained(safe_serialization=True)") from None
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    if trained.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained.weights_dir))
        if quant is None:  # merged: one matmul per layer again, as fast as the base model
            model = model.merge_and_unload()
    if quant is None:
        model = model.to(device)
    if quantization == "dynamic_int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch marks the eager-mode API deprecated; it still ships
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    model.config.use_cache = True
    return model


# --------------------------------------------------------------------------- generation


def generate_measured(accelerator, model, samples: Sequence, encoder, tok, cfg: Config, kind: ModelKind) -> tuple[list[str], dict]:
    """Summaries in the samples' order, and the speed figures of generating them."""
    batch_size = cfg.inference.batch_size or cfg.batch.eval_batch_size
    preds, seconds = evaluate.generate(accelerator, model, samples, encoder, tok, cfg.inference, kind, batch_size,
                                       sort_by_length=cfg.inference.sort_by_length)
    return preds, {**_speed(len(samples), seconds), "batch_size": batch_size,
                   "sort_by_length": cfg.inference.sort_by_length}


def submission_csv(samples: Sequence, summaries: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fname", "summary"])
    for s, text in zip(samples, summaries):
        writer.writerow([s.fname, text])
    return buf.getvalue()


def run_predict(cfg: Config, output_dir: Path, metrics: dict) -> None:
    """mode=predict: dev ROUGE and speed (eval.enabled), the quantized-vs-unquantized comparison,
    and the submission. Fills `metrics`; the caller writes it."""
    from accelerate import Accelerator

    api = cfg.model.kind == ModelKind.api
    # only a few-shot prompt reads the training set; a trained model's predict needs none
    splits = data_mod.load_splits(cfg.data, need_train=api and cfg.solar.prompt_strategy != "zero_shot")
    target = splits.test if cfg.predict.split == "test" else splits.dev
    if cfg.mode == "predict" and cfg.predict.submission:
        _check_target(cfg, target)
    if cfg.model.kind == ModelKind.api:
        return _predict_api(cfg, output_dir, metrics, splits, target)
    acc = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available())
    trained = locate(cfg)
    mc = trained.model_cfg
    tok = load_saved_tokenizer(trained)
    encoder = data_mod.Encoder(tok, mc.kind, mc.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    metrics.update(model=mc.name, device=measure.device_name(acc.device), num_processes=acc.num_processes,
                   trained_from=str(trained.weights_dir), lora_adapter=trained.adapter)
    quantization = cfg.inference.quantization
    monitor = measure.MemoryMonitor(acc.device, cfg.measure.rss_interval_ms).start()
    try:
        metrics["phase"] = "load"
        model = load_for_inference(trained, tok, acc.device, quantization)
        metrics["inference"] = {"quantization": quantization, "model_bytes": model_bytes(model)}
        if cfg.eval.enabled and cfg.eval.generate and splits.dev:
            metrics["phase"] = "eval"
            preds, speed = generate_measured(acc, model, splits.dev, encoder, tok, cfg, mc.kind)
            ev = {**evaluate.score(splits.dev, preds, cfg.eval.rouge_tokenizer), **speed}
            if cfg.eval.save_predictions and acc.is_main_process:
                evaluate.save_predictions(output_dir / "dev_predictions.csv", splits.dev, preds)
            if quantization != "none" and cfg.inference.compare_unquantized:
                base = _measure(acc, load_for_inference(trained, tok, acc.device, "none"), splits.dev, encoder, tok,
                                cfg, mc.kind)
                ev.update(quantization=quantization, unquantized=base, **_change(ev, base))
            metrics["eval"] = ev
        if cfg.predict.submission:
            metrics["phase"] = "predict"
            summaries, speed = generate_measured(acc, model, target, encoder, tok, cfg, mc.kind)
            _write_submission(acc.is_main_process, output_dir, target, summaries, speed, metrics)
    finally:
        metrics["memory"] = {"peak_bytes": monitor.peak_bytes(), "source": monitor.source}
        monitor.stop()


def _check_target(cfg: Config, target) -> None:
    """The submission's rows: refused when there are none, a warning for repeated ids."""
    from collections import Counter

    split_file = cfg.data.test_file if cfg.predict.split == "test" else cfg.data.dev_file
    if not target:
        raise DataError(f"mode=predict writes a submission for the {cfg.predict.split} set, but {split_file} is "
                        f"missing or empty in {cfg.data.dir or 'the bundled sample'}: add it, set predict.split=dev, "
                        f"or predict.submission=false")
    repeated = sorted(f for f, n in Counter(s.fname for s in target).items() if n > 1)
    if repeated:
        log.warning("%s repeats %d fname(s) (%s%s): each row gets its own summary, and a scorer keyed by fname "
                    "will see duplicates", split_file, len(repeated), ", ".join(repeated[:5]),
                    ", ..." if len(repeated) > 5 else "")


def _measure(acc, model, samples, encoder, tok, cfg: Config, kind: ModelKind) -> dict:
    preds, speed = generate_measured(acc, model, samples, encoder, tok, cfg, kind)
    return {**evaluate.score(samples, preds, cfg.eval.rouge_tokenizer), **speed, "model_bytes": model_bytes(model)}


def _change(quantized: dict, base: dict) -> dict:
    """ROUGE change and generation speed-up of `quantized` against `base` (same samples)."""
    return {"rouge_mean_change": quantized["rouge_mean"] - base["rouge_mean"],
            "speedup": base["generation_ms_per_sample"] / quantized["generation_ms_per_sample"]}


def quantized_eval(acc, cfg: Config, model_dir: Path, samples, base: dict) -> dict:
    """After training: the saved weights loaded with inference.quantization, measured on the same
    dev samples as the trained model (`base`)."""
    if not (model_dir / SAVED_CONFIG).is_file():
        raise ConfigError(f"inference.quantization={cfg.inference.quantization} loads the saved weights: "
                          f"set train.save_model=true")
    acc.wait_for_everyone()
    trained = locate_folder(model_dir)
    tok = load_saved_tokenizer(trained)
    encoder = data_mod.Encoder(tok, trained.model_cfg.kind, trained.model_cfg.prompt_template,
                               cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    model = load_for_inference(trained, tok, acc.device, cfg.inference.quantization)
    ev = _measure(acc, model, samples, encoder, tok, cfg, trained.model_cfg.kind)
    return {"quantization": cfg.inference.quantization, **ev, **_change(ev, base)}


def load_saved_tokenizer(trained: Trained):
    """The tokenizer saved beside the weights (masked tokens already special), else the model's."""
    if not (trained.weights_dir / "tokenizer_config.json").is_file():
        return models.load_tokenizer(trained.model_cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained.weights_dir), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_bytes(model) -> int:
    """Bytes of the weights as held for inference (int8 packed, 4-bit, or float)."""
    total = 0
    for value in model.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _write_submission(is_main: bool, output_dir: Path, target, summaries, speed: dict, metrics: dict) -> None:
    if is_main:
        atomic_write_text(output_dir / SUBMISSION_FILE, submission_csv(target, summaries))
    from collections import Counter

    metrics["predict"] = {**speed, "file": str(output_dir / SUBMISSION_FILE), "rows": len(target),
                          "repeated_fnames": sum(1 for n in Counter(s.fname for s in target).values() if n > 1)}


def _speed(n: int, seconds: float) -> dict:
    """One definition of the generation speed figures (ms per sample, samples/s)."""
    return {"n": n, "generation_seconds": seconds, "generation_ms_per_sample": 1000 * seconds / max(n, 1),
            "generation_samples_per_s": n / seconds if seconds else None}


def _predict_api(cfg: Config, output_dir: Path, metrics: dict, splits, target) -> None:
    """model=solar_api: the same outputs through the chat-completions client (one process: every
    request is paid and rate-limited, so config.validate refuses a multi-process launch)."""
    from summ.solar import SolarClient

    examples = [(s.dialogue, s.summary) for s in splits.train]
    client = SolarClient(cfg.solar)
    metrics.update(model=cfg.model.name, device=f"api:{cfg.solar.model}", num_processes=1)

    def summarize(samples) -> tuple[list[str], dict]:
        start = measure.now()
        out = client.summarize([s.dialogue for s in samples], examples)
        return out, _speed(len(samples), measure.now() - start)

    try:
        if cfg.eval.enabled and splits.dev:
            metrics["phase"] = "eval"
            preds, speed = summarize(splits.dev)
            metrics["eval"] = {**evaluate.score(splits.dev, preds, cfg.eval.rouge_tokenizer), **speed}
            if cfg.eval.save_predictions:
                evaluate.save_predictions(output_dir / "dev_predictions.csv", splits.dev, preds)
        if cfg.mode == "predict" and cfg.predict.submission:
            metrics["phase"] = "predict"
            _write_submission(True, output_dir, target, *summarize(target), metrics)
    finally:
        metrics["solar"] = {"model": cfg.solar.model, "prompt_strategy": cfg.solar.prompt_strategy, **client.stats}
        client.close()
