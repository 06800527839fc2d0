"""The training loop and the task function behind run.py: train(cfg) -> metrics.

One job: load data and model, train with Accelerate (gradient accumulation, clipping, mixed
precision), evaluate, and measure what each sample cost. Every outcome, good or bad, ends in a
metrics.json in the output directory; the process is left clean for the next job of a sweep.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from summ import data as data_mod
from summ import augment, checkpoint, ensemble, evaluate, generation, measure, models, quality, tracking, tta
from summ.config import Config, ModelKind, resolve_batch, validate
from summ.distributed import is_main_process, rank
from summ.errors import ConfigError, DataError, Diverged, Interrupted, OverBudget, UserError
from summ.io import atomic_write_json, atomic_write_text, make_folder, write_jsonl
from summ.loss import model_inputs, summed_token_loss
from summ.report import METRICS_FILE  # one definition; sweep and app import it from here too

log = logging.getLogger(__name__)

HISTORY_FILE = "train_history.jsonl"  # one line per optimizer step: loss, lr, step time, memory
MicroStepHook = Callable[[int, int], None]  # (optimizer step, micro-step in the window)


def config_hash(cfg: DictConfig, leave_out: tuple[str, ...] = ()) -> str:
    """Identity of a job's resolved config, for sweep resume. The `sweep` section is left out:
    setting sweep.resume=true must not make a finished cell look different. `leave_out`: more
    keys (dotted) that do not change what is computed."""
    kept = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in ("sweep", "hydra")])
    for key in leave_out:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(kept, parent) if parent else kept
        if node is not None and leaf in node:
            with open_dict(node):
                del node[leaf]
    return hashlib.sha256(OmegaConf.to_yaml(kept, resolve=True).encode()).hexdigest()[:16]


def objective_value(metrics: dict, cfg: Config) -> float | tuple[float, float]:
    """What a sweeper optimises. Single objectives are minimised; the configured penalty (finite,
    worse than any feasible value) stands in where the job gave no figure (oom, over_budget,
    diverged, failed), so Optuna's samplers learn to avoid that region instead of crashing.
    `seconds_per_sample_and_rouge` returns (seconds per sample to minimise, ROUGE mean to
    maximise), with (penalty, 0.0) for a job without both figures."""
    train, ev = metrics.get("train") or {}, metrics.get("eval") or {}
    ok = metrics.get("status") == "ok"

    def figure(value) -> Optional[float]:
        return float(value) if ok and value is not None and math.isfinite(value) else None

    if cfg.objective == "seconds_per_sample_and_rouge":
        s, r = figure(train.get("seconds_per_sample")), figure(ev.get("rouge_mean"))
        return (s, r) if s is not None and r is not None else (float(cfg.objective_penalty), 0.0)
    value = {
        "train_seconds_per_sample": train.get("seconds_per_sample"),
        "train_seconds_per_token": train.get("seconds_per_token"),
        "eval_loss": ev.get("loss"),
        "neg_rouge_mean": -ev["rouge_mean"] if ev.get("rouge_mean") is not None else None,
    }[cfg.objective]
    value = figure(value)
    return value if value is not None else float(cfg.objective_penalty)


def build_optimizer(decay: list, no_decay: list, tcfg) -> torch.optim.Optimizer:
    """AdamW, weight decay off for biases and norms; the fused kernel (one launch for all
    parameters, as the HF Trainer's default adamw_torch_fused) where every parameter allows it."""
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, eps=tcfg.adam_epsilon, fused=fused or None)


def penalty_value(cfg: Config) -> float | tuple[float, float]:
    """The objective of a job that produced no figure."""
    return objective_value({"status": "failed"}, cfg)


def _skeleton(cfg: Config, cfg_hash: str) -> dict:
    return {
        "status": "failed", "error": None, "phase": None,
        "model": cfg.model.name, "data": cfg.data.name, "device": None, "num_processes": None,
        "batch_size": cfg.batch.batch_size, "gradient_accumulation_steps": cfg.batch.gradient_accumulation_steps,
        "effective_batch_size": None, "mixed_precision": cfg.train.mixed_precision.value,
        "gradient_checkpointing": cfg.model.gradient_checkpointing, "quantization": cfg.model.quantization,
        "lora": cfg.model.lora.enabled, "config_hash": cfg_hash,
        "random_init": cfg.model.tiny is not None and not cfg.model.path,  # a test-size model, not pretrained
        "train": None, "memory": None, "eval": None,
        "epoch_seconds_projected": None, "mfu": None,
    }


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide state; a sweep's next job may use another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


class _Job:
    """State of one run, held in one place so that close() can drop every reference."""

    def __init__(self, cfg: Config, output_dir: Path, metrics: dict, on_micro_step: Optional[MicroStepHook]):
        self.cfg, self.output_dir, self.metrics, self.on_micro_step = cfg, output_dir, metrics, on_micro_step
        self.accelerator = self.model = self.optimizer = self.monitor = None
        self.history: list[dict] = []
        self.tracking = tracking.Tracking()  # inactive until setup starts it
        self.stop = checkpoint.StopRequest()  # SIGINT / SIGTERM while training
        self.tracking_names: tuple[str, Optional[str]] = (output_dir.name, None)  # (run, sweep group)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.utils import GradientAccumulationPlugin, set_seed
        from transformers import get_scheduler  # imported before memory is counted (tens of MB of code)

        cfg, m = self.cfg, self.metrics
        _reset_accelerate()
        m["phase"] = "setup"
        use_cpu = cfg.train.cpu or not torch.cuda.is_available()
        num_processes = PartialState(cpu=use_cpu).num_processes
        self.bs, self.ga, _ = resolve_batch(cfg.batch.batch_size, cfg.batch.gradient_accumulation_steps,
                                              cfg.batch.effective_batch_size, num_processes)
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.train.mixed_precision.value, cpu=use_cpu,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.ga, sync_with_dataloader=False),
            **tracking.accelerator_kwargs(cfg.tracking, self.output_dir))
        self.tracking = tracking.start(acc, cfg.tracking, cfg, *self.tracking_names)
        set_seed(cfg.train.seed)
        m.update(device=measure.device_name(acc.device), num_processes=acc.num_processes,
                 gradient_accumulation_steps=self.ga, effective_batch_size=self.bs * self.ga * acc.num_processes)
        m["phase"] = "load"
        self.splits = data_mod.load_splits(cfg.data)
        self.oof: list = []
        if cfg.train.fold is not None:  # K-fold member: hold one fold out of training
            held = set(data_mod.fold_indices(len(self.splits.train), cfg.train.k_folds, cfg.train.fold_seed)[cfg.train.fold])
            self.oof = [s for i, s in enumerate(self.splits.train) if i in held]
            self.splits.train = [s for i, s in enumerate(self.splits.train) if i not in held]
        if cfg.data.validate:
            self._validate_data()
        if cfg.augmentation.methods and cfg.augmentation.ratio > 0:
            new, report = augment.augment(self.splits.train, cfg.augmentation, self.backend())
            self.splits.train = self.splits.train + new  # training only: dev and test stay as loaded
            m["augmentation"] = report
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.kind = cfg.model.kind
        self.encoder = data_mod.Encoder(self.tokenizer, self.kind, cfg.model.prompt_template,
                                        cfg.data.encoder_max_len, cfg.data.decoder_max_len)
        train_ds = data_mod.TokenizedDataset(self.splits.train, self.encoder)
        dev_ds = data_mod.TokenizedDataset(self.splits.dev, self.encoder)
        models.preimport(cfg.model)
        # Memory is counted from here: model, optimizer state, activations (as on a GPU),
        # not the tokenized data or the imported code.
        self.monitor = measure.MemoryMonitor(acc.device, cfg.measure.rss_interval_ms).start()
        self.guard = measure.BudgetGuard(self.monitor, cfg.measure.memory_budget_gb, cfg.measure.headroom)
        loaded = models.load(cfg.model, self.tokenizer, cfg.train.seed, acc.device)
        m.update(trainable_params=loaded.trainable_params, total_params=loaded.total_params,
                 train_set_size=len(self.splits.train), eval_set_size=len(self.splits.dev))
        widths = self.encoder.max_widths() if cfg.data.padding == "max_length" else (None, None)
        collator = data_mod.Collator(self.tokenizer.pad_token_id, self.kind, loaded.decoder_start_token_id, *widths)
        self.sampler = data_mod.EpochSampler(train_ds.lengths(), seed=cfg.train.seed,
                                             group_by_length=cfg.data.group_by_length, batch_size=self.bs)
        loader_kw = dict(collate_fn=collator, num_workers=cfg.data.num_workers,
                         pin_memory=acc.device.type == "cuda")
        # drop_last: every micro-batch is full, so every update sees exactly the effective batch
        # and per-step figures compare; the next epoch's permutation brings the dropped samples back.
        train_loader = torch.utils.data.DataLoader(train_ds, batch_size=self.bs, sampler=self.sampler,
                                                   drop_last=True, **loader_kw)
        dev_loader = torch.utils.data.DataLoader(dev_ds, batch_size=cfg.batch.eval_batch_size, shuffle=False, **loader_kw)
        decay = [p for p in loaded.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in loaded.model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms
        optimizer = build_optimizer(decay, no_decay, cfg.train)
        self.model, self.optimizer, self.train_loader, self.dev_loader = acc.prepare(
            loaded.model, optimizer, train_loader, dev_loader)
        del loaded

        updates_per_epoch = len(self.train_loader) // self.ga
        if updates_per_epoch == 0:
            raise ConfigError(f"the effective batch {m['effective_batch_size']} is larger than the training set "
                              f"({len(train_ds)} samples): lower batch.batch_size or the accumulation, "
                              f"or raise data.max_train_samples")
        if cfg.measure.steps:
            self.total_updates = cfg.measure.warmup_steps + cfg.measure.steps
        elif cfg.train.total_samples:
            self.total_updates = max(1, round(cfg.train.total_samples / m["effective_batch_size"]))
        elif cfg.train.max_steps:
            self.total_updates = cfg.train.max_steps
        else:
            self.total_updates = cfg.train.epochs * updates_per_epoch
        self.updates_per_epoch = updates_per_epoch
        name = "constant_with_warmup" if cfg.train.scheduler.value == "constant" else cfg.train.scheduler.value
        # Not prepared by Accelerate: it is stepped once per optimizer step, on every process.
        self.scheduler = get_scheduler(name, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.train.warmup_ratio * self.total_updates),
                                       num_training_steps=self.total_updates)
        acc.register_for_checkpointing(self.scheduler)  # its position travels with the checkpoint
        self.start_step, self.position = 0, {"epoch": 0, "batches": 0}
        if cfg.train.resume_from:
            ckpt = checkpoint.resolve(cfg.train.resume_from, self.output_dir)
            self.position, self.history = checkpoint.load(acc, ckpt, self.identity)
            self.start_step = self.position.pop("step")
            m["resumed_from"] = {"checkpoint": str(ckpt), "step": self.start_step}
            if self.start_step >= self.total_updates:
                raise ConfigError(f"{ckpt} is at step {self.start_step}, the end of this run's "
                                  f"{self.total_updates} steps: nothing to resume")
            log.info("resuming from %s at optimizer step %d (epoch %d)", ckpt, self.start_step, self.position["epoch"])
        if acc.is_main_process:
            log.info("model %s (%s): %s trainable of %s parameters | device %s x%d | micro-batch %d x accumulation "
                     "%d x processes %d = effective batch %d | %d optimizer steps (%d per epoch of %d samples)",
                     cfg.model.name, self.kind.value, f"{m['trainable_params']:,}", f"{m['total_params']:,}",
                     m["device"], acc.num_processes, self.bs, self.ga, acc.num_processes, m["effective_batch_size"],
                     self.total_updates, updates_per_epoch, len(train_ds))

    def backend(self):
        """The generation backend (back-translation, paraphrase), built on first use, or None."""
        if not hasattr(self, "_backend"):
            self._backend = generation.build(self.cfg.generation, Path(self.cfg.generation.cache_dir), self.cfg.solar)
        return self._backend

    def _validate_data(self) -> None:
        """Score train and dev; leave low-scoring training samples out, listed in data_quality.csv."""
        thr = self.cfg.data.quality_threshold
        train_rows = quality.assess(self.splits.train, "train", thr)
        dev_rows = quality.assess(self.splits.dev, "dev", thr)
        if self.accelerator.is_main_process:
            atomic_write_text(self.output_dir / "data_quality.csv", quality.to_csv(train_rows + dev_rows))
        self.splits.train = [s for s, r in zip(self.splits.train, train_rows) if r.kept]
        self.metrics["data_quality"] = {**quality.summarize(train_rows + dev_rows), "threshold": thr}
        if not self.splits.train:
            raise DataError(f"every training sample scored under data.quality_threshold={thr}: "
                            f"see {self.output_dir / 'data_quality.csv'}")

    # ------------------------------------------------------------------ training
    def _windows(self):
        """Yield lists of `ga` micro-batches forever, epoch after epoch, from self.position (a
        resumed run skips the micro-batches its checkpoint had consumed: same data order). A
        trailing partial window is dropped, like a partial micro-batch (see drop_last above)."""
        epoch, skip = self.position["epoch"], self.position["batches"]
        resumed = self.start_step > 0
        while True:
            self.train_loader.set_epoch(epoch)
            window, consumed = [], 0
            rng = torch.get_rng_state()
            batches = iter(self.train_loader)
            first = next(batches, None)  # the loader starts on first use and draws a seed from torch's RNG...
            if resumed:  # ... which the interrupted run drew before its checkpoint: not again
                torch.set_rng_state(rng)
                resumed = False
            for batch in itertools.chain([] if first is None else [first], batches):
                consumed += 1
                if consumed <= skip:
                    continue
                window.append(batch)
                if len(window) == self.ga:
                    self.position = {"epoch": epoch, "batches": consumed}
                    yield epoch, window
                    window = []
            epoch, skip = epoch + 1, 0

    def train(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, m = self.cfg, self.accelerator, self.metrics
        m["phase"] = "train"
        timer = measure.StepTimer(warmup_steps=cfg.measure.warmup_steps)
        profile = None
        device = acc.device
        self.model.train()
        # None: shown on a terminal only (logs and CI stay readable); one bar per machine
        bar = tqdm(total=self.total_updates, desc="train", unit="step",
                   disable=None if acc.is_local_main_process else True, dynamic_ncols=True, leave=False)
        windows = self._windows()
        loss_value = None
        bar.update(self.start_step)
        # no bar (output to a file or a pipe): a progress line in the log every train.log_every_steps
        lines = bar.disable and acc.is_main_process
        started = measure.now()
        try:
            for step in range(self.start_step, self.total_updates):
                measure.synchronize(device)
                t_step = measure.now()
                epoch, window = next(windows)
                rows = torch.tensor([[len(b["input_ids"]), *measure.batch_token_counts(b),
                                      measure.label_token_count(b)] for b in window], device=device)
                # padded positions of this process's largest micro-batch: what its memory peak scales with
                timer.note_positions(int((rows[:, 1] + rows[:, 2]).max()))
                samples, tokens, pads, n_items = (int(x) for x in acc.reduce(rows.sum(0), reduction="sum"))
                loss_sum = torch.zeros((), device=device)
                for micro, batch in enumerate(window):
                    t_micro = measure.now()
                    with acc.accumulate(self.model):
                        if profile is None and not timer.measuring:  # counted FLOPs slow this step: never a timed one
                            profiler = measure.ProfileMicroStep()
                            with profiler:
                                part = self._forward_backward(batch, n_items, step, micro)
                            profile = profiler.profile
                            profile.tokens = sum(measure.batch_token_counts(batch))  # padded positions
                        else:
                            part = self._forward_backward(batch, n_items, step, micro)
                        if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    loss_sum += part
                    measure.synchronize(device)
                    timer.add_micro(measure.now() - t_micro)
                self.scheduler.step()
                loss_value = float(acc.reduce(loss_sum, reduction="sum")) / max(n_items, 1)  # waits for the device
                step_seconds = measure.now() - t_step
                timer.add_step(step_seconds, samples=samples, tokens=tokens, pad_tokens=pads)
                peak = self.monitor.peak_bytes()
                self.history.append({"step": step + 1, "epoch": epoch, "loss": loss_value,
                                     "lr": self.scheduler.get_last_lr()[0], "step_time_s": step_seconds,
                                     "samples_per_s": samples / step_seconds, "tokens_per_s": tokens / step_seconds,
                                     "peak_mem_bytes": peak})
                self.tracking.log_step(self.history[-1], step + 1)
                if not math.isfinite(loss_value):
                    raise Diverged(f"loss became {loss_value} at optimizer step {step + 1}")
                peak_all, signum = self._agree(peak, self.stop.signum or 0)
                self.guard.check(peak_all)
                bar.update(1)
                self._maybe_checkpoint(step + 1, signum)
                if (step + 1) % cfg.train.log_every_steps == 0 or step == 0:
                    bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{samples / step_seconds:.1f}")
                    if lines:
                        done = step + 1 - self.start_step
                        eta = (measure.now() - started) / done * (self.total_updates - step - 1)
                        log.info("step %d/%d | loss %.4f | %.1f samples/s | ETA %s", step + 1, self.total_updates,
                                 loss_value, samples / step_seconds, _duration(eta))
        finally:
            bar.close()
            self._record_train(timer, profile, loss_value)

    def _agree(self, peak: int, signum: int) -> tuple[int, int]:
        """The largest peak and any stop signal over all processes, in one collective: each
        process then makes the same budget and checkpoint decisions (none waits alone)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return peak, signum
        both = acc.reduce(torch.tensor([peak, signum], dtype=torch.int64, device=acc.device), reduction="max")
        return int(both[0]), int(both[1])

    def _maybe_checkpoint(self, done: int, signum: int) -> None:
        """After optimizer step `done`: a checkpoint every train.save_every_steps, and on a
        stop signal a checkpoint then Interrupted. A signal in the last step lets the run finish."""
        every, last = self.cfg.train.save_every_steps, done >= self.total_updates
        if (signum and not last) or (every and done % every == 0 and not last):
            path = checkpoint.save(self.accelerator, self.output_dir, done, self.position, self.history,
                                   self.cfg.train.keep_checkpoints, self.identity)
            if signum:
                raise Interrupted(signum, done, path)

    def _forward_backward(self, batch: dict, n_items: int, step: int, micro: int) -> torch.Tensor:
        acc = self.accelerator
        if self.on_micro_step is not None:
            self.on_micro_step(step, micro)
        logits = self.model(**model_inputs(batch)).logits
        loss_sum = summed_token_loss(logits, batch["labels"], self.kind, self.cfg.train.label_smoothing)
        # Normalise by the label tokens of the whole window on all processes. Accelerate divides
        # by the accumulation steps and DDP averages over processes: undo both.
        acc.backward(loss_sum * (self.ga * acc.num_processes / max(n_items, 1)))
        return loss_sum.detach()

    def _record_train(self, timer: measure.StepTimer, profile, final_loss) -> None:
        cfg, m = self.cfg, self.metrics
        t = timer.summary()
        t["final_loss"] = final_loss
        t["total_optimizer_steps"] = self.start_step + timer.steps_seen  # a resumed run counts from its checkpoint
        n = self.accelerator.num_processes  # samples and tokens are counted over all processes
        t["samples_per_s_per_process"] = t["samples_per_s"] / n if t.get("samples_per_s") else None
        t["tokens_per_s_per_process"] = t["tokens_per_s"] / n if t.get("tokens_per_s") else None
        m["train"] = t
        if profile is not None:  # FLOPs scale with padded positions, so MFU counts those on both sides
            t["flops_per_position"] = profile.flops / profile.tokens if profile.tokens else None
            t["activation_bytes_first_micro_batch"] = profile.activation_bytes
        if t["samples_per_s"]:
            m["epoch_seconds_projected"] = len(self.splits.train) / t["samples_per_s"]
        peak = measure.peak_flops(self.accelerator.device, cfg.train.mixed_precision.value, cfg.measure.peak_tflops)
        if peak and t.get("flops_per_position") and t["seconds"]:
            positions_per_s = (t["tokens"] + t["pad_tokens"]) / t["seconds"]
            m["mfu"] = t["flops_per_position"] * positions_per_s / (peak * self.accelerator.num_processes)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> None:
        cfg, acc, m = self.cfg, self.accelerator, self.metrics
        if not cfg.eval.enabled or not self.splits.dev:
            return
        m["phase"] = "eval"
        result: dict[str, Any] = {"loss": evaluate.eval_loss(acc, self.model, self.dev_loader, self.kind)}
        if cfg.eval.generate:
            from summ.predict import generate_measured, quantized_eval

            preds, speed = generate_measured(acc, self.model, self.splits.dev, self.encoder, self.tokenizer, cfg,
                                             self.kind)
            result.update(evaluate.score(self.splits.dev, preds, cfg.eval.rouge_tokenizer), **speed)
            if cfg.inference.quantization != "none":  # the saved weights, quantized, against this model
                result["quantized"] = quantized_eval(acc, cfg, self.output_dir / "model", self.splits.dev, result)
            final = preds
            if cfg.tta.num_aug > 0 and cfg.tta.methods:
                final, result["tta"] = self._tta(preds)
            if cfg.eval.save_predictions and acc.is_main_process:
                evaluate.save_predictions(self.output_dir / "dev_predictions.csv", self.splits.dev, final)
        else:
            result.update(rouge1=None, rouge2=None, rougeL=None, rouge_sum=None, rouge_mean=None)
        result.setdefault("n", len(self.splits.dev))
        if self.oof and cfg.eval.generate:  # out-of-fold predictions of a K-fold member
            n = cfg.ensemble.stacking_candidates if cfg.ensemble.strategy == "stacking" else 1
            oof = evaluate.generate(acc, self.model, self.oof, self.encoder, self.tokenizer,
                                    cfg.inference, self.kind, cfg.batch.eval_batch_size, num_candidates=n)[0]
            oof_preds = [c[0] for c in oof] if n > 1 else oof
            result["oof"] = evaluate.score(self.oof, oof_preds, cfg.eval.rouge_tokenizer)
            if acc.is_main_process:
                evaluate.save_predictions(self.output_dir / "oof_predictions.csv", self.oof, oof_preds)
                if n > 1:  # what the stacking selector trains on
                    atomic_write_text(self.output_dir / "oof_candidates.jsonl", "".join(
                        json.dumps({"fname": s.fname, "references": s.summaries, "candidates": c},
                                   ensure_ascii=False) + "\n" for s, c in zip(self.oof, oof)))
        m["eval"] = result
        self.guard.check(self._agree(self.monitor.peak_bytes(), 0)[0])

    def _tta(self, preds: list[str]) -> tuple[list[str], dict]:
        """Summaries of perturbed copies of each dev dialogue, reduced to one by MBR."""
        cfg = self.cfg
        methods, skipped = tta.usable_methods(cfg.tta, self.backend())
        start = measure.now()
        copies = tta.perturb(self.splits.dev, cfg.tta, methods, self.tokenizer.mask_token, self.backend())
        candidates = [[p] for p in preds]
        for copy in copies:
            more, _ = evaluate.generate(self.accelerator, self.model, copy, self.encoder, self.tokenizer,
                                        cfg.inference, self.kind, cfg.batch.eval_batch_size)
            for c, p in zip(candidates, more):
                c.append(p)
        chosen = [c[ensemble.mbr_select(c)] for c in candidates]
        extra = measure.now() - start
        scores = evaluate.score(self.splits.dev, chosen, cfg.eval.rouge_tokenizer)
        return chosen, {**scores, "methods": methods, "skipped": skipped, "num_aug": cfg.tta.num_aug,
                        "extra_seconds": extra, "extra_ms_per_sample": 1000 * extra / max(len(preds), 1),
                        "picked_original": sum(c[0] == x for c, x in zip(candidates, chosen))}

    def save(self) -> None:
        """What mode=predict needs: weights (the LoRA adapter alone for peft models) as
        safetensors, tokenizer and resolved config, in <run dir>/model."""
        if not self.cfg.train.save_model:
            return
        from summ.predict import save_for_predict

        if self.accelerator.is_main_process:
            save_for_predict(self.accelerator, self.model, self.tokenizer, self.cfg, self.output_dir / "model")
        self.accelerator.wait_for_everyone()  # the saved model is complete before any process reads it

    # ------------------------------------------------------------------ teardown
    def gather_peaks(self) -> None:
        """Every process's peak memory (a collective: only on the path all processes reach)."""
        if self.accelerator.num_processes > 1:
            mine = torch.tensor([self.monitor.peak_bytes()], dtype=torch.int64, device=self.accelerator.device)
            self.process_peaks = [int(x) for x in self.accelerator.gather(mine).cpu()]

    def record_memory(self) -> None:
        if self.monitor is None:
            return
        peaks = getattr(self, "process_peaks", None)
        # the largest process's peak: what must fit on each device
        peak, capacity = (max(peaks) if peaks else self.monitor.peak_bytes()), self.monitor.capacity_bytes()
        self.metrics["memory"] = {
            "peak_bytes": peak, "peak_bytes_per_process": peaks, "reserved_bytes": self.monitor.reserved_bytes(), "capacity_bytes": capacity,
            "fraction": peak / capacity if capacity else None, "source": self.monitor.source,
            "budget_bytes": self.guard.budget_bytes, "limit_bytes": self.guard.limit_bytes,
        }

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.accelerator is not None:
            self.accelerator.free_memory()
        for name in ("model", "optimizer", "train_loader", "dev_loader", "scheduler", "accelerator", "monitor"):
            setattr(self, name, None)
        _reset_accelerate()
        measure.release_memory()


def train(cfg: DictConfig, output_dir: str | os.PathLike, on_micro_step: Optional[MicroStepHook] = None,
          keep: Optional[list] = None, tracking_names: Optional[tuple[str, Optional[str]]] = None) -> dict:
    """Run one job and return its metrics (also written to <output_dir>/metrics.json).

    Job-level failures (oom, over_budget, diverged, failed) are recorded, not raised, so a sweep
    goes on; a UserError (bad config, data, weights) is recorded and then raised for run.py.
    With train.k_folds > 1 the job is K jobs (fold_<k>/) and an ensemble of their summaries.
    mode=predict, and a hosted model (model.kind=api), summarise without training (summ/predict.py).
    `keep`, a list, receives the trained model and its tokenizer and encoder (logit averaging).
    `tracking_names`: (run name, sweep group) for the experiment tracker.
    """
    validate(cfg)
    obj: Config = OmegaConf.to_object(cfg)
    output_dir = make_folder(output_dir)  # a folder that cannot be made fails now, not after training
    if obj.mode == "predict" or obj.model.kind == ModelKind.api:
        from summ.predict import run_predict

        metrics = {**_skeleton(obj, config_hash(cfg)), "mode": obj.mode}
        with recorded(metrics, output_dir):
            run_predict(obj, output_dir, metrics)
        return metrics
    if cfg.train.k_folds > 1 and cfg.train.fold is None:
        return train_kfold(cfg, output_dir, tracking_names)
    metrics = _skeleton(obj, config_hash(cfg))
    job = _Job(obj, output_dir, metrics, on_micro_step)
    # what a checkpoint must match to be resumed: the config, less where and how it is saved
    job.identity = config_hash(cfg, leave_out=("train.resume_from", "train.save_every_steps",
                                               "train.keep_checkpoints", "tracking", "save_visualizations"))
    if tracking_names is not None:
        job.tracking_names = tracking_names
    finished = False
    with recorded(metrics, output_dir, job):
        try:
            job.setup()
            with job.stop.installed():
                job.train()
            job.save()
            job.evaluate()
            job.gather_peaks()
            finished = True
        finally:
            job.record_memory()
            if keep is not None and finished:
                keep.append((job.accelerator.unwrap_model(job.model).eval(), job.tokenizer, job.encoder))
            job.close()
    return metrics


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _save_plots(job: "_Job", output_dir: Path) -> None:
    from summ.plots import save_run_plots

    try:
        save_run_plots(job.history, output_dir, job.cfg.measure.warmup_steps, title=job.cfg.model.name)
    except Exception as exc:  # a figure must never cost the run its metrics
        log.warning("save_visualizations: the plots failed (%s); rebuild them with python -m summ.plots %s",
                    exc, output_dir)


@contextlib.contextmanager
def recorded(metrics: dict, output_dir: Path, job: Optional["_Job"] = None):
    """Turn the job's outcome into metrics["status"] and write metrics.json (and the step history),
    whatever happens. A UserError is re-raised after the write (run.py prints its one line)."""
    started = measure.now()
    raise_after: Optional[BaseException] = None
    try:
        yield
        metrics["status"], metrics["phase"] = "ok", None
    except OverBudget as exc:
        metrics.update(status="over_budget", error=str(exc))
    except (torch.OutOfMemoryError, MemoryError):
        metrics.update(status="oom", error=f"out of memory during {metrics['phase']}")
    except Diverged as exc:
        metrics.update(status="diverged", error=str(exc))
    except Interrupted as exc:  # written, then raised: run.py says how to resume and exits
        metrics.update(status="interrupted", error=str(exc), checkpoint=str(exc.checkpoint))
        raise_after = exc
    except KeyboardInterrupt as exc:  # outside the training loop (setup, evaluation): no checkpoint
        metrics.update(status="interrupted", error=f"KeyboardInterrupt during {metrics['phase']}")
        raise_after = exc
    except UserError as exc:
        metrics.update(status="failed", error=str(exc))
        raise_after = exc
    except Exception as exc:  # a bug or an unforeseen library error: recorded, the sweep goes on
        metrics.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        atomic_write_text(output_dir / ("error.log" if is_main_process() else f"error.rank{rank()}.log"),
                          traceback.format_exc())
    metrics["wall_seconds"] = measure.now() - started  # the whole job: setup, training, evaluation
    if not is_main_process():  # one set of files per run (and one tracker run): process 0's
        if raise_after is not None:
            raise raise_after
        return
    if job is not None and job.history:
        write_jsonl(output_dir / HISTORY_FILE, job.history)
    atomic_write_json(output_dir / METRICS_FILE, metrics)
    if job is not None and job.history and job.cfg.save_visualizations:
        _save_plots(job, output_dir)
    if job is not None:
        job.tracking.finish(metrics)  # the final figures and status, known only now
    if raise_after is not None:
        raise raise_after


def train_kfold(cfg: DictConfig, output_dir: Path, tracking_names: Optional[tuple] = None) -> dict:
    """K models on K splits of the training set; out-of-fold predictions in each fold_<k>/;
    per-fold metrics with mean and standard deviation; the members' dev summaries ensembled."""
    import statistics


    k = cfg.train.k_folds
    folds = []
    kept: Optional[list] = [] if cfg.ensemble.strategy == "logit_avg" else None
    for fold in range(k):
        sub = cfg.copy()
        sub.train.fold = fold
        run_name, group = tracking_names or (output_dir.name, None)  # each fold a tracker run, grouped by the job
        folds.append(train(sub, output_dir / f"fold_{fold}", keep=kept,
                           tracking_names=(f"{run_name}/fold_{fold}", group or run_name)))
    # cost figures (train, memory) are fold 0's: every fold trains the same configuration
    metrics = {key: folds[0].get(key) for key in ("model", "data", "device", "num_processes", "batch_size",
                                                  "gradient_accumulation_steps", "effective_batch_size",
                                                  "mixed_precision", "gradient_checkpointing", "quantization",
                                                  "lora", "train", "memory", "epoch_seconds_projected", "mfu")}
    metrics["config_hash"] = config_hash(cfg)
    failed = [f for f in folds if f["status"] != "ok"]
    metrics.update(status=failed[0]["status"] if failed else "ok",
                   error=f"fold {folds.index(failed[0])}: {failed[0]['error']}" if failed else None, phase=None)

    def spread(values: list) -> dict:
        values = [v for v in values if v is not None]
        return {"mean": statistics.fmean(values) if values else None,
                "std": statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None}

    ev = [f.get("eval") or {} for f in folds]
    metrics["folds"] = [{"fold": i, "status": f["status"], "samples_per_s": (f.get("train") or {}).get("samples_per_s"),
                         "eval_loss": e.get("loss"), "rouge_mean": e.get("rouge_mean"),
                         "oof_rouge_mean": (e.get("oof") or {}).get("rouge_mean")} for i, (f, e) in enumerate(zip(folds, ev))]
    metrics["kfold"] = {"k": k, "fold_seed": cfg.train.fold_seed,
                        **{name: spread([r[name] for r in metrics["folds"]])
                           for name in ("samples_per_s", "eval_loss", "rouge_mean", "oof_rouge_mean")}}
    metrics["eval"] = None
    member_preds = [_read_predictions(output_dir / f"fold_{i}" / "dev_predictions.csv") for i in range(k)]
    try:
        if not failed and all(member_preds) and cfg.eval.enabled and cfg.eval.generate:
            _ensemble(cfg, output_dir, metrics, member_preds, kept)
    except UserError as exc:
        metrics.update(status="failed", error=str(exc), phase="ensemble")
        atomic_write_json(output_dir / METRICS_FILE, metrics)
        raise
    except (torch.OutOfMemoryError, MemoryError):
        metrics.update(status="oom", error="out of memory during ensemble", phase="ensemble")
    except Exception as exc:  # recorded like any job failure, so a sweep goes on
        metrics.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0], phase="ensemble")
        atomic_write_text(output_dir / "error.log", traceback.format_exc())
    finally:
        if kept:
            kept.clear()
            measure.release_memory()
    atomic_write_json(output_dir / METRICS_FILE, metrics)
    return metrics


def _ensemble(cfg: DictConfig, output_dir: Path, metrics: dict, member_preds: list, kept: Optional[list]) -> None:
    """The K members' dev summaries made one, by the configured strategy."""
    from summ import ensemble
    from summ.data import load_splits

    k = cfg.train.k_folds
    obj: Config = OmegaConf.to_object(cfg)
    dev = load_splits(obj.data).dev
    strategy = cfg.ensemble.strategy
    weights = [max(r["rouge_mean"] or 0.0, 1e-6) for r in metrics["folds"]] if strategy == "weighted" else None
    info: dict[str, Any] = {"strategy": strategy, "members_rouge_mean": [r["rouge_mean"] for r in metrics["folds"]],
                            "weights": weights}
    if strategy == "logit_avg":
        chosen, info["generation_seconds"] = _logit_average(kept, dev, obj)
    else:
        if strategy == "stacking":
            selector, info["stacking"] = _fit_stacking(output_dir, k, obj)
        chosen = []
        for i in range(len(dev)):
            cands = [p[i] for p in member_preds]
            pick = (ensemble.stack_select(cands, selector) if strategy == "stacking"
                    else ensemble.mbr_select(cands, weights))
            chosen.append(cands[pick])
    scores = evaluate.score(dev, chosen, obj.eval.rouge_tokenizer)
    metrics["eval"] = {**scores, "loss": metrics["kfold"]["eval_loss"]["mean"], "ensemble": info}
    evaluate.save_predictions(output_dir / "dev_predictions.csv", dev, chosen)


def _logit_average(kept: list, dev: list, obj: Config) -> tuple[list[str], float]:
    """Summaries decoded from the members' averaged next-token log-probabilities."""
    from accelerate import Accelerator

    _reset_accelerate()
    acc = Accelerator(cpu=obj.train.cpu or not torch.cuda.is_available(),
                      mixed_precision=obj.train.mixed_precision.value)
    (first, tok, enc), rest = kept[0], [m for m, _, _ in kept[1:]]
    if any(t.get_vocab() != tok.get_vocab() for _, t, _ in kept[1:]):
        raise ConfigError("ensemble.strategy=logit_avg needs members that share a tokenizer: use mbr or weighted")
    try:
        return evaluate.generate(acc, first, dev, enc, tok, obj.inference, obj.model.kind,
                                 obj.batch.eval_batch_size, co_members=rest)
    finally:
        _reset_accelerate()


def _fit_stacking(output_dir: Path, k: int, obj: Config) -> tuple[list[float], dict]:
    """Train the stacking selector on every fold's out-of-fold candidates."""
    from summ import ensemble
    from summ.scoring import pair_rouge_mean

    groups = []
    for fold in range(k):
        for line in (output_dir / f"fold_{fold}" / "oof_candidates.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            cands = row["candidates"]
            if len(cands) > 1:
                target = [sum(pair_rouge_mean(c, r, obj.eval.rouge_tokenizer) for r in row["references"])
                          / max(len(row["references"]), 1) for c in cands]
                groups.append((cands, target))
    if not groups:
        raise DataError("stacking found no out-of-fold candidate sets: set inference.num_beams >= 2")
    weights = ensemble.fit_selector(groups)
    return weights, {"train_dialogues": len(groups), "features": dict(zip(ensemble.FEATURES, weights))}


def _read_predictions(path: Path) -> Optional[list[str]]:
    import csv

    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as fh:
        return [row["prediction"] for row in csv.DictReader(fh)]
