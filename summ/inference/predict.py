"""Inference: summaries from a trained run (or the Solar API) for the test set and the dev set,
with the generation speed measured and quantized generation compared against unquantized.

    python run.py mode=predict model.path=outputs/runs/<run>            # submission.csv + dev ROUGE
    python run.py mode=predict model.path=<run> inference.quantization=dynamic_int8
    python run.py -m preset=inference_speed model.path=<run>             # speed against ROUGE report

`model.path=<run dir>` brings back the model's kind, prompt and architecture by itself (what a
training run saves: summ/modeling/saved.py). A plain folder with config.json and *.safetensors
works too, with the model group chosen on the command line.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from summ.config import Config, ModelKind
from summ.data.splits import load_splits
from summ.data.tokenize import Encoder
from summ.errors import ConfigError, DataError
from summ.figures import MemoryFigures
from summ.inference import evaluate
from summ.inference.solar import SolarClient
from summ.measure.components import kv_cache_bytes
from summ.measure.machine import device_name
from summ.measure.memory import MemoryMonitor
from summ.measure.timing import now
from summ.modeling.saved import load_for_inference, load_saved_tokenizer, locate, locate_folder, model_bytes
from summ.run_folder import DEV_PREDICTIONS_FILE, SAVED_CONFIG, SUBMISSION_FILE, RunMetrics, write_text

log = logging.getLogger(__name__)


def generate_measured(
    accelerator, model, samples: Sequence, encoder, tok, cfg: Config, kind: ModelKind
) -> tuple[list[str], dict]:
    """Summaries in the samples' order, and the speed figures of generating them."""
    batch_size = cfg.inference.batch_size or cfg.batch.eval_batch_size
    preds, seconds = evaluate.generate(
        accelerator,
        model,
        samples,
        encoder,
        tok,
        cfg.inference,
        kind,
        batch_size,
        sort_by_length=cfg.inference.sort_by_length,
    )
    return preds, {
        **_speed(len(samples), seconds),
        "batch_size": batch_size,
        "sort_by_length": cfg.inference.sort_by_length,
        "kv_cache_bytes": _kv_cache(accelerator, model, samples, encoder, cfg, kind, batch_size),
    }


def _kv_cache(accelerator, model, samples: Sequence, encoder, cfg: Config, kind: ModelKind, batch_size: int):
    """Generation's key/value cache at its longest batch (summ/measure/components.py: kv_cache_bytes):
    batch x beams sequences at the longest prompt and every new token, in the dtype the forward
    computes in (autocast's under mixed precision)."""
    if not samples:
        return None
    unwrapped = accelerator.unwrap_model(model)
    longest = encoder.longest_prompt(samples)
    mixed = str(accelerator.mixed_precision) in ("bf16", "fp16")
    element = 2 if mixed else unwrapped.dtype.itemsize
    sequences = min(batch_size, len(samples)) * max(1, cfg.inference.num_beams)
    seq2seq = kind == ModelKind.seq2seq
    return kv_cache_bytes(unwrapped.config, seq2seq, sequences, longest, cfg.inference.max_new_tokens, element)


def submission_csv(samples: Sequence, summaries: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fname", "summary"])
    for s, text in zip(samples, summaries):
        writer.writerow([s.fname, text])
    return buf.getvalue()


def run_predict(cfg: Config, output_dir: Path, metrics: RunMetrics) -> None:
    """mode=predict: dev ROUGE and speed (eval.enabled), the quantized-vs-unquantized comparison,
    and the submission. Fills `metrics`; the caller writes it."""
    from accelerate import Accelerator

    api = cfg.model.kind == ModelKind.api
    # only a few-shot prompt reads the training set; a trained model's predict needs none
    splits = load_splits(cfg.data, need_train=api and cfg.solar.prompt_strategy != "zero_shot")
    target = splits.test if cfg.predict.split == "test" else splits.dev
    if cfg.mode == "predict" and cfg.predict.submission:
        _check_target(cfg, target)
    if api:
        return _predict_api(cfg, output_dir, metrics, splits, target)
    acc = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available())
    trained = locate(cfg)
    mc = trained.model_cfg
    tok = load_saved_tokenizer(trained)
    encoder = Encoder(tok, mc.kind, mc.prompt_template, cfg.data.encoder_max_len, cfg.data.decoder_max_len)
    metrics.model, metrics.device, metrics.num_processes = mc.name, device_name(acc.device), acc.num_processes
    metrics.trained_from, metrics.lora_adapter = str(trained.weights_dir), trained.adapter
    quantization = cfg.inference.quantization
    monitor = MemoryMonitor(
        acc.device, cfg.measure.rss_interval_ms, cpu_live_memory=cfg.measure.cpu_live_memory
    ).start()
    try:
        metrics.phase = "load"
        model = load_for_inference(trained, tok, acc.device, quantization)
        metrics.inference = {"quantization": quantization, "model_bytes": model_bytes(model)}
        if cfg.eval.enabled and cfg.eval.generate and splits.dev:
            metrics.phase = "eval"
            preds, speed = generate_measured(acc, model, splits.dev, encoder, tok, cfg, mc.kind)
            ev = {**evaluate.score(splits.dev, preds, cfg.eval.rouge_tokenizer), **speed}
            if cfg.eval.save_predictions and acc.is_main_process:
                evaluate.save_predictions(output_dir / DEV_PREDICTIONS_FILE, splits.dev, preds)
            if quantization != "none" and cfg.inference.compare_unquantized:
                base = _measure(
                    acc, load_for_inference(trained, tok, acc.device, "none"), splits.dev, encoder, tok, cfg, mc.kind
                )
                ev.update(quantization=quantization, unquantized=base, **_change(ev, base))
            metrics.eval = ev
        if cfg.predict.submission:
            metrics.phase = "predict"
            summaries, speed = generate_measured(acc, model, target, encoder, tok, cfg, mc.kind)
            write_submission(acc.is_main_process, output_dir, target, summaries, speed, metrics)
    finally:  # no training here: the whole peak is inference's
        peak = monitor.peak_bytes()
        metrics.memory = MemoryFigures(
            peak_bytes=peak, observed_peak_bytes=peak, eval_peak_bytes=peak, source=monitor.source
        )
        monitor.stop()


def _check_target(cfg: Config, target) -> None:
    """The submission's rows: refused when there are none, a warning for repeated ids."""
    split_file = cfg.data.test_file if cfg.predict.split == "test" else cfg.data.dev_file
    if not target:
        raise DataError(
            f"mode=predict writes a submission for the {cfg.predict.split} set, but {split_file} is "
            f"missing or empty in {cfg.data.dir or 'the bundled sample'}: add it, set predict.split=dev, "
            f"or predict.submission=false"
        )
    repeated = sorted(f for f, n in Counter(s.fname for s in target).items() if n > 1)
    if repeated:
        log.warning(
            "%s repeats %d fname(s) (%s%s): each row gets its own summary, and a scorer keyed by fname "
            "will see duplicates",
            split_file,
            len(repeated),
            ", ".join(repeated[:5]),
            ", ..." if len(repeated) > 5 else "",
        )


def _measure(acc, model, samples, encoder, tok, cfg: Config, kind: ModelKind) -> dict:
    preds, speed = generate_measured(acc, model, samples, encoder, tok, cfg, kind)
    return {**evaluate.score(samples, preds, cfg.eval.rouge_tokenizer), **speed, "model_bytes": model_bytes(model)}


def _change(quantized: dict, base: dict) -> dict:
    """ROUGE change and generation speed-up of `quantized` against `base` (same samples)."""
    return {
        "rouge_mean_change": quantized["rouge_mean"] - base["rouge_mean"],
        "speedup": base["generation_ms_per_sample"] / quantized["generation_ms_per_sample"],
    }


def quantized_eval(acc, cfg: Config, model_dir: Path, samples, base: dict) -> dict:
    """After training: the saved weights loaded with inference.quantization, measured on the same
    dev samples as the trained model (`base`)."""
    if not (model_dir / SAVED_CONFIG).is_file():
        raise ConfigError(
            f"inference.quantization={cfg.inference.quantization} loads the saved weights: set train.save_model=true"
        )
    acc.wait_for_everyone()
    trained = locate_folder(model_dir)
    tok = load_saved_tokenizer(trained)
    encoder = Encoder(
        tok,
        trained.model_cfg.kind,
        trained.model_cfg.prompt_template,
        cfg.data.encoder_max_len,
        cfg.data.decoder_max_len,
    )
    model = load_for_inference(trained, tok, acc.device, cfg.inference.quantization)
    ev = _measure(acc, model, samples, encoder, tok, cfg, trained.model_cfg.kind)
    return {"quantization": cfg.inference.quantization, **ev, **_change(ev, base)}


def write_submission(is_main: bool, output_dir: Path, target, summaries, speed: dict, metrics: RunMetrics) -> None:
    empty = sum(not s.strip() for s in summaries)
    if empty:  # a tiny inference.max_new_tokens, or a model that only ends sentences: a submission of blanks
        log.warning(
            "%d of %d summaries are empty: raise inference.max_new_tokens, or check the model", empty, len(summaries)
        )
    if is_main:
        write_text(output_dir, SUBMISSION_FILE, submission_csv(target, summaries))
    metrics.predict = {
        **speed,
        "file": str(output_dir / SUBMISSION_FILE),
        "rows": len(target),
        "repeated_fnames": sum(1 for n in Counter(s.fname for s in target).values() if n > 1),
    }


def _speed(n: int, seconds: float) -> dict:
    """One definition of the generation speed figures (ms per sample, samples/s)."""
    return {
        "n": n,
        "generation_seconds": seconds,
        "generation_ms_per_sample": 1000 * seconds / max(n, 1),
        "generation_samples_per_s": n / seconds if seconds else None,
    }


def _predict_api(cfg: Config, output_dir: Path, metrics: RunMetrics, splits, target) -> None:
    """model=solar_api: the same outputs through the chat-completions client (one process: every
    request is paid and rate-limited, so summ.validation refuses a multi-process launch)."""
    examples = [(s.dialogue, s.summary) for s in splits.train]
    client = SolarClient(cfg.solar)
    metrics.model, metrics.device, metrics.num_processes = cfg.model.name, f"api:{cfg.solar.model}", 1

    def summarize(samples) -> tuple[list[str], dict]:
        start = now()
        out = client.summarize([s.dialogue for s in samples], examples)
        return out, _speed(len(samples), now() - start)

    try:
        if cfg.eval.enabled and splits.dev:
            metrics.phase = "eval"
            preds, speed = summarize(splits.dev)
            metrics.eval = {**evaluate.score(splits.dev, preds, cfg.eval.rouge_tokenizer), **speed}
            if cfg.eval.save_predictions:
                evaluate.save_predictions(output_dir / DEV_PREDICTIONS_FILE, splits.dev, preds)
        if cfg.mode == "predict" and cfg.predict.submission:
            metrics.phase = "predict"
            write_submission(True, output_dir, target, *summarize(target), metrics)
    finally:
        metrics.solar = {"model": cfg.solar.model, "prompt_strategy": str(cfg.solar.prompt_strategy), **client.stats}
        client.close()
