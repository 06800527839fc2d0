"""One training run: data and model prepared, the Accelerate loop (gradient accumulation, clipping,
mixed precision), evaluation, and what each sample cost. Setup reads as its steps; the loop reads top
to bottom. Every outcome ends in the run's metrics record (summ/training/outcome.py); the process is
left clean for the next job of a sweep."""
from __future__ import annotations

import gc
import logging
import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from summ import failpoints
from summ.config import Config, resolve_batch
from summ.data.sampler import EpochSampler
from summ.data.tokenize import Collator
from summ.distributed import sharded_by
from summ.errors import ConfigError, Diverged, Interrupted
from summ.inference import backends
from summ.measure import flops, machine, timing
from summ.measure.memory import BudgetGuard, MemoryMonitor, release_memory
from summ.modeling import models
from summ.modeling.loss import model_inputs, summed_token_loss
from summ.modeling.saved import save_for_predict
from summ.run_folder import MODEL_DIR, RunMetrics
from summ.training import batches, checkpoint, cleanup, launchers, processes, reuse, tracking
from summ.training.evaluation import evaluate
from summ.training.measurement import (Measurement, epoch_plan, probe_memory, probe_samples, probe_widths,
                                       schedule_length, warm_training_paths, window)
from summ.training.optimizers import build_optimizer
from summ.training.outcome import recorded
from summ.training.prepare import data_for

log = logging.getLogger(__name__)


class Job:
    """State of one run, held in one place so that close() can drop every reference."""

    def __init__(self, cfg: Config, output_dir: Path, metrics: RunMetrics, identity: str,
                 tracking_names: Optional[tuple[str, Optional[str]]] = None, reuse_loaded: bool = False):
        self.cfg, self.output_dir, self.metrics = cfg, output_dir, metrics
        self.identity = identity  # what a checkpoint must match to be resumed
        self.accelerator = self.model = self.optimizer = self.monitor = self.guard = self.measurement = None
        self.history: list[dict] = []
        self.tracking = tracking.Tracking()  # inactive until setup starts it
        self.stop = checkpoint.StopRequest()  # SIGINT / SIGTERM while training
        self.tracking_names = tracking_names or (output_dir.name, None)  # (run, sweep group)
        self.process_peaks: Optional[list[int]] = None
        self._backend = None
        self.reuse_loaded = reuse_loaded  # share data and model with the sweep's other cells (summ/training/reuse.py)
        self.kept: Optional[reuse.KeptModel] = None

    # ------------------------------------------------------------------ setup, step by step
    def setup(self) -> None:
        self.metrics.phase = "setup"
        self._start_accelerator()
        self.metrics.phase = "load"
        self._prepare_data()
        base = self._kept_model() if self._model_reusable() else None  # resident before the count starts
        self._start_memory()  # memory is counted from here: model, optimizer state, activations (as on a GPU)
        self._load_model(base)
        self._make_loaders_and_optimizer()
        self._make_schedule()
        self._resume()
        self._say_plan()

    def _start_accelerator(self) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        cfg, m = self.cfg, self.metrics
        cleanup.reset_accelerate()
        use_cpu = cfg.train.cpu or not torch.cuda.is_available()
        timeout = cfg.measure.collective_timeout_s  # at the group's creation, and on a group an earlier cell made
        num_processes = PartialState(cpu=use_cpu, **({"timeout": timedelta(seconds=timeout)} if timeout else {})
                                     ).num_processes
        if timeout:
            processes.set_collective_timeout(timeout)
        self.bs, self.ga, _ = resolve_batch(cfg.batch.batch_size, cfg.batch.gradient_accumulation_steps,
                                            cfg.batch.effective_batch_size, num_processes)
        self.accelerator = acc = Accelerator(
            mixed_precision=str(cfg.train.mixed_precision), cpu=use_cpu,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.ga, sync_with_dataloader=False),
            **tracking.accelerator_kwargs(cfg.tracking, self.output_dir))
        self.tracking = tracking.start(acc, cfg.tracking, cfg, *self.tracking_names)
        set_seed(cfg.train.seed)
        m.device, m.num_processes = machine.device_name(acc.device), acc.num_processes
        m.gradient_accumulation_steps, m.effective_batch_size = self.ga, self.bs * self.ga * acc.num_processes

    def backend(self):
        """The generation backend (back-translation, paraphrase), built on first use, or None."""
        if self._backend is None:
            self._backend = backends.build(self.cfg.generation, Path(self.cfg.generation.cache_dir), self.cfg.solar)
        return self._backend

    def _prepare_data(self) -> None:
        cfg = self.cfg
        self.data, self.tokenizer, self.encoder, reused = data_for(
            cfg, self.backend, self.output_dir if self.accelerator.is_main_process else None, self.reuse_loaded)
        self.reused = {"data": reused, "model": False}
        self.metrics.augmentation, self.metrics.data_quality = self.data.augmentation, self.data.data_quality
        self.splits, self.oof, self.kind = self.data.splits, self.data.oof, cfg.model.kind
        models.preimport(cfg.model)  # imported code is not the run's memory

    def _model_reusable(self) -> bool:
        """A sweep cell on one process: a sharded or several-process launch wraps the model for good."""
        return self.reuse_loaded and self.accelerator.num_processes == 1

    def _kept_model(self):
        """The sweep's loaded model for this config, on the device before the cell's memory count
        starts (the count adds its weights)."""
        self.kept, self.reused["model"] = reuse.kept_base(self.cfg, self.tokenizer, self.accelerator.device)
        if self.accelerator.is_main_process:
            log.info("sweep.reuse_loaded: %s", ", ".join(f"{what} {'reused from an earlier cell' if hit else 'loaded'}"
                                                        for what, hit in self.reused.items()))
        return self.kept.model

    def _start_memory(self) -> None:
        cfg, device = self.cfg, self.accelerator.device
        warm_training_paths()
        self.monitor = MemoryMonitor(device, cfg.measure.rss_interval_ms,
                                     cpu_live_memory=cfg.measure.cpu_live_memory).start()
        self.guard = BudgetGuard(self.monitor, cfg.measure.memory_budget_gb, cfg.measure.headroom)
        if cfg.measure.memory_budget_gb:  # a big card runs out where the planned one would
            self.monitor.cap(self.guard.budget_bytes)
        self.measurement = Measurement(cfg, self.monitor, self.guard, cfg.measure.warmup_steps, device)

    def _load_model(self, base=None) -> None:
        cfg = self.cfg
        if base is not None:
            self.monitor.weights_bytes = self.kept.weights_bytes
            self.loaded = models.with_adapters(cfg.model, base, self.tokenizer, cfg.train.seed)
        else:
            self.loaded = models.load(cfg.model, self.tokenizer, cfg.train.seed, self.accelerator.device)
        self.metrics.reused = self.reused if self.reuse_loaded else None
        self.metrics.trainable_params, self.metrics.total_params = self.loaded.trainable_params, self.loaded.total_params
        self.metrics.train_set_size, self.metrics.eval_set_size = len(self.splits.train), len(self.splits.dev)

    def _make_loaders_and_optimizer(self) -> None:
        cfg, acc, loaded = self.cfg, self.accelerator, self.loaded
        widths = self.encoder.max_widths() if cfg.data.padding == "max_length" else (None, None)
        self.collator = collator = Collator(self.tokenizer.pad_token_id, self.kind, loaded.decoder_start_token_id, *widths)
        self.effective_batch = self.bs * self.ga * acc.num_processes
        self.sampler = EpochSampler(self.data.train_ds.lengths(), seed=cfg.train.seed,
                                    group_by_length=cfg.data.group_by_length, batch_size=self.bs,
                                    window=window(cfg, self.effective_batch))
        cuda = acc.device.type == "cuda"  # workers collate the next batches while the GPU computes
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if cuda else 0)
        loader_kw = dict(collate_fn=collator, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)
        # drop_last: every micro-batch is full, so every update sees exactly the effective batch
        # and per-step figures compare; the next epoch's permutation brings the dropped samples back.
        train_loader = torch.utils.data.DataLoader(self.data.train_ds, batch_size=self.bs, sampler=self.sampler,
                                                   drop_last=True, **loader_kw)
        dev_loader = torch.utils.data.DataLoader(self.data.dev_ds, batch_size=cfg.batch.eval_batch_size,
                                                 shuffle=False, **loader_kw)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        optimizer = build_optimizer([p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2], cfg.train)
        launchers.before_prepare(acc, cfg.train.max_grad_norm, str(self.kind), str(cfg.model.quantization))
        self.model, self.optimizer, self.train_loader, self.dev_loader = acc.prepare(
            loaded.model, optimizer, train_loader, dev_loader)
        launchers.check_prepared(acc, self.ga, cfg.train.max_grad_norm)  # what DeepSpeed's config may override
        self.loaded = None
        self.measurement.probe_skipped = launchers.probe_skipped(acc) if cfg.measure.memory_probe else None

    def _make_schedule(self) -> None:
        from transformers import get_scheduler

        cfg, m = self.cfg, self.metrics
        self.epoch = epoch_plan(self.data.train_ds, self.collator, cfg, self.bs, self.ga, self.accelerator.num_processes)
        self.updates_per_epoch = self.epoch[0]
        if self.updates_per_epoch == 0:
            raise ConfigError(f"the effective batch {m.effective_batch_size} is larger than the training set "
                              f"({len(self.data.train_ds)} samples): lower batch.batch_size or the accumulation, "
                              f"or raise data.max_train_samples")
        self.total_updates = schedule_length(cfg, self.updates_per_epoch, m.effective_batch_size)
        self.warmup_steps = self.measurement.plan(m, len(self.data.train_ds))
        name = "constant_with_warmup" if cfg.train.scheduler == "constant" else str(cfg.train.scheduler)
        # Not prepared by Accelerate: it is stepped once per optimizer step, on every process.
        self.scheduler = get_scheduler(name, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.train.warmup_ratio * self.total_updates),
                                       num_training_steps=self.total_updates)
        self.accelerator.register_for_checkpointing(self.scheduler)  # its position travels with the checkpoint

    def _resume(self) -> None:
        self.start_step, self.position = 0, {"epoch": 0, "batches": 0}
        if not self.cfg.train.resume_from:
            return
        ckpt = checkpoint.resolve(self.cfg.train.resume_from, self.output_dir)
        self.position, self.history = checkpoint.load(self.accelerator, ckpt, self.identity)
        self.start_step = self.position.pop("step")
        self.metrics.resumed_from = {"checkpoint": str(ckpt), "step": self.start_step}
        if self.start_step >= self.total_updates:
            raise ConfigError(f"{ckpt} is at step {self.start_step}, the end of this run's "
                              f"{self.total_updates} steps: nothing to resume")
        log.info("resuming from %s at optimizer step %d (epoch %d)", ckpt, self.start_step, self.position["epoch"])

    def _say_plan(self) -> None:
        m, acc = self.metrics, self.accelerator
        if acc.is_main_process:
            log.info("model %s (%s): %s trainable of %s parameters | device %s x%d | micro-batch %d x accumulation "
                     "%d x processes %d = effective batch %d | %d optimizer steps (%d per epoch of %d samples)",
                     self.cfg.model.name, self.kind, f"{m.trainable_params:,}", f"{m.total_params:,}", m.device,
                     acc.num_processes, self.bs, self.ga, acc.num_processes, m.effective_batch_size,
                     self.total_updates, self.updates_per_epoch, len(self.data.train_ds))

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """The training loop. Long because it reads top to bottom: every step's order of operations
        (data, forward and backward per micro-batch, update, figures, checks, checkpoint) in one place.
        A step's time runs from the end of the step before to the end of this one (summ/measure/timing.py)."""
        from tqdm.auto import tqdm

        cfg, acc, meas = self.cfg, self.accelerator, self.measurement
        self.metrics.phase = "train"
        device = acc.device
        self.model.train()
        # None: shown on a terminal only (logs and CI stay readable); one bar per machine
        bar = tqdm(total=self.total_updates, desc="train", unit="step",
                   disable=None if acc.is_local_main_process else True, dynamic_ncols=True, leave=False)
        groups = batches.accumulation_groups(self.train_loader, self.ga, self.position["epoch"],
                                             self.position["batches"], resumed=self.start_step > 0)
        loss_value = None
        bar.update(self.start_step)
        lines = bar.disable and acc.is_main_process  # no bar: a progress line in the log instead
        started = meas.clock.start()
        try:
            for step in range(self.start_step, self.total_updates):
                if step == self.warmup_steps:  # between warm-up and the measured steps
                    if cfg.measure.memory_probe and not meas.probe_skipped:
                        self._probe()  # the worst batch's memory
                    meas.load.start()
                    meas.clock.start()  # after the probe's work is done on the device
                epoch, window, self.position = next(groups)
                samples, tokens, pads, n_items = processes.window_counts(acc, window)
                measuring = meas.timer.measuring
                loss_sum = torch.zeros((), device=device)
                failed: Optional[processes.Failure] = None  # this process failed in this step (several processes)
                meas.micro.mark()
                for micro, batch in enumerate(window):
                    with acc.accumulate(self.model):
                        if failed is None:
                            try:
                                part = self._micro_step(batch, n_items, step, micro, measuring)
                            except Exception as exc:  # the others go on to the step's collectives: so must this one
                                if (failed := processes.shared_failure(acc, exc)) is None:
                                    raise
                        if failed is not None:  # out of the except block: the failed step's tensors are freed
                            part = processes.stand_in(acc, self.model, batch, acc.sync_gradients)
                        try:
                            self._update(step, failed=failed is not None)
                        except Exception as exc:
                            if (failed := processes.shared_failure(acc, exc)) is None:
                                raise
                    loss_sum += part
                    meas.micro.mark()
                self.scheduler.step()
                loss_value = float(acc.reduce(loss_sum, reduction="sum")) / max(n_items, 1)  # the step's one sync
                for seconds in meas.micro.times():
                    meas.timer.add_micro(seconds)
                peak = self.monitor.peak_bytes()
                if not math.isfinite(loss_value):
                    raise Diverged(f"loss became {loss_value} at optimizer step {step + 1}")
                peak_all, signum = processes.agree(acc, meas.worst_peak(peak), self.stop.signum or 0, failed,
                                                   f"optimizer step {step + 1}")
                self.guard.check(peak_all)
                if measuring:
                    meas.step_positions.append(tokens + pads)
                step_seconds = meas.clock.lap()
                if measuring:  # what else runs on the machine, read between steps: not in a step's time
                    meas.load.sample()
                    meas.clock.start()
                meas.timer.add_step(step_seconds, samples=samples, tokens=tokens, pad_tokens=pads)
                meas.timer.note_positions(max(sum(b["counts"][1:3]) for b in window))
                self.history.append({"step": step + 1, "epoch": epoch, "loss": loss_value,
                                     "lr": self.scheduler.get_last_lr()[0], "step_time_s": step_seconds,
                                     "samples_per_s": samples / step_seconds, "tokens_per_s": tokens / step_seconds,
                                     "peak_mem_bytes": peak})
                self.tracking.log_step(self.history[-1], step + 1)  # queued by the tracker, not waited on
                bar.update(1)
                if (step + 1) % cfg.train.log_every_steps == 0 or step == 0:
                    bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{samples / step_seconds:.1f}")
                    if lines:
                        eta = (timing.now() - started) / (step + 1 - self.start_step) * (self.total_updates - step - 1)
                        log.info("step %d/%d | loss %.4f | %.1f samples/s | ETA %s", step + 1, self.total_updates,
                                 loss_value, samples / step_seconds, _duration(eta))
                if self._maybe_checkpoint(step + 1, signum):
                    meas.clock.start()  # a checkpoint is between steps: in the loop's time, not a step's
        finally:
            bar.close()
            meas.loop_seconds = timing.now() - started
            self._record_train(loss_value)

    def where(self, step: int, micro_step: Optional[int] = None) -> failpoints.Where:
        """This cell and optimizer step (from 1) as the failpoints filter them (summ/failpoints.py)."""
        return failpoints.Where(micro_batch=self.bs, accumulation=self.ga, step=step, micro_step=micro_step)

    def _update(self, step: int, failed: bool) -> None:
        """Clip and step at the micro-step that syncs (Accelerate's optimizer skips the others).
        `failed`: this process failed earlier in this step; it still clips (a collective where
        parameters are sharded), then only drops its gradients."""
        acc = self.accelerator
        if acc.sync_gradients:
            if not failed:
                failpoints.hit("optimizer", self.where(step + 1))
            if self.cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        if not failed:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_step(self, batch: dict, n_items: int, step: int, micro: int, measuring: bool) -> torch.Tensor:
        meas = self.measurement
        if meas.profile is None and not measuring:  # counted FLOPs slow this step: never a timed one
            with flops.ProfileMicroStep(self.model, positions=sum(batch["counts"][1:3])) as profiler:
                part = self._forward_backward(batch, n_items, step, micro)
            meas.profile = profiler.profile
            return part
        return self._forward_backward(batch, n_items, step, micro)

    def _probe(self) -> None:
        """The worst batch's memory, between warm-up and the measured steps (measurement.probe_memory)."""
        widths = probe_widths(self.data.train_ds)
        features = [self.data.train_ds[i] for i in probe_samples(self.data.train_ds, self.bs)]
        batch = Collator(self.collator.pad, self.kind, self.collator.decoder_start, *widths)(features)
        acc, peak, failed = self.accelerator, 0, None
        self.measurement.clock.start()
        try:
            with acc.no_sync(self.model), failpoints.inside_forward(  # no gradient all-reduce: nothing for
                    lambda: acc.unwrap_model(self.model), "probe", self.where(self.warmup_steps + 1)):  # the others to wait in
                peak = probe_memory(acc, self.model, self.optimizer, batch, self.kind, self.measurement)
        except Exception as exc:
            if (failed := processes.shared_failure(acc, exc)) is None:
                raise
        self.measurement.probe_seconds = self.measurement.clock.lap()  # its work done on the device
        if failed is None:
            log.info("memory probe: a micro-batch of %d at widths %s peaked at %.3f GiB", self.bs, widths, peak / 2**30)
        self.guard.check(processes.agree(acc, self.measurement.worst_peak(peak), 0, failed, "the memory probe")[0])

    def _maybe_checkpoint(self, done: int, signum: int) -> bool:
        """After optimizer step `done`: a checkpoint every train.save_every_steps, and on a stop
        signal a checkpoint then Interrupted. A signal in the last step lets the run finish.
        True when a checkpoint was written."""
        every, last = self.cfg.train.save_every_steps, done >= self.total_updates
        if (signum and not last) or (every and done % every == 0 and not last):
            failpoints.hit("save", self.where(done))
            path = checkpoint.save(self.accelerator, self.output_dir, done, self.position, self.history,
                                   self.cfg.train.keep_checkpoints, self.identity, stopping=bool(signum))
            if signum:
                raise Interrupted(signum, done, path)
            return True
        return False

    def _forward_backward(self, batch: dict, n_items: int, step: int, micro: int) -> torch.Tensor:
        acc = self.accelerator
        where = self.where(step + 1, micro + 1)
        with failpoints.inside_forward(lambda: acc.unwrap_model(self.model), "forward", where):
            logits = self.model(**model_inputs(batch)).logits
        failpoints.inside_backward(logits, where)
        loss_sum = summed_token_loss(logits, batch["labels"], self.kind, self.cfg.train.label_smoothing,
                                     batch["counts"].label_tokens)
        # Normalise by the label tokens of the whole window on all processes. Accelerate divides
        # by the accumulation steps and DDP averages over processes: undo both.
        acc.backward(loss_sum * (self.ga * acc.num_processes / max(n_items, 1)))
        return loss_sum.detach()

    def _record_train(self, final_loss: Optional[float]) -> None:
        meas = self.measurement
        self.metrics.machine = meas.load.finish() if meas.timer.measured_steps else None
        self.metrics.train = meas.train_figures(self.metrics, final_loss, self.start_step + meas.timer.steps_seen,
                                                self.accelerator.num_processes, self.epoch)

    # ------------------------------------------------------------------ after training
    def save(self) -> None:
        """What mode=predict needs (weights or the LoRA adapter, tokenizer, config) in <run dir>/model."""
        if not self.cfg.train.save_model:
            return
        self.metrics.phase = "save"
        failpoints.hit("save", self.where(self.start_step + self.measurement.timer.steps_seen))
        acc = self.accelerator  # sharded weights are gathered by every process together (a collective)
        weights = acc.get_state_dict(self.model) if sharded_by(acc) == "fsdp" else None
        if acc.is_main_process:
            save_for_predict(acc, self.model, self.tokenizer, self.cfg, self.output_dir / MODEL_DIR, weights)
        self.accelerator.wait_for_everyone()  # the saved model is complete before any process reads it

    def gather_peaks(self) -> None:
        """Every process's worst peak (a collective: only on the path all processes reach)."""
        if self.accelerator.num_processes > 1:
            mine = self.measurement.memory_figures(None).peak_bytes
            tensor = torch.tensor([mine], dtype=torch.int64, device=self.accelerator.device)
            self.process_peaks = [int(x) for x in self.accelerator.gather(tensor).cpu()]

    def record_memory(self) -> None:
        if self.measurement is not None:
            self.metrics.memory = self.measurement.memory_figures(self.process_peaks)

    def close(self) -> None:
        """Drop everything the run holds, so that the next cell of a sweep starts as a fresh process
        would. Called while an error that ended the run may still be on its way out: the frames
        its traceback holds (the failed step's batch, logits and graph, the optimizer and loader
        they reach) are cleared first, or nothing below could free them."""
        cleanup.clear_frames(sys.exc_info()[1])
        if self.monitor is not None:
            self.monitor.stop()
        if self.kept is not None:  # back to its kept form for the next cell
            model = self.model if self.model is not None else (self.loaded.model if self.loaded else None)
            if model is not None:
                reuse.give_back(self.kept, self.accelerator.unwrap_model(model, keep_fp32_wrapper=False))
        if self.accelerator is not None:
            self.accelerator.free_memory()
        for name in ("model", "optimizer", "train_loader", "dev_loader", "scheduler", "accelerator", "monitor", "loaded"):
            setattr(self, name, None)
        cleanup.reset_accelerate()
        release_memory()
        if self.reuse_loaded:  # what outlives the cell (imported code, kept data) leaves the collector's walks
            gc.freeze()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_training(cfg: Config, output_dir: Path, metrics: RunMetrics, identity: str, keep: Optional[list] = None,
                 tracking_names: Optional[tuple[str, Optional[str]]] = None, reuse_loaded: bool = False) -> RunMetrics:
    """One training run, recorded in `metrics` and in the run folder whatever happens (a UserError
    or an interruption is raised again after the write). `keep`, a list, receives the trained model
    with its tokenizer and encoder (a K-fold logit ensemble decodes with them). `reuse_loaded`: a
    sweep's cell, sharing data and model with the process's other cells."""
    job = Job(cfg, output_dir, metrics, identity, tracking_names, reuse_loaded and keep is None)
    finished = False
    with recorded(metrics, output_dir, job):
        try:
            job.setup()
            with job.stop.installed():
                job.train()
            job.save()
            evaluate(job)
            job.gather_peaks()
            finished = True
        finally:
            job.record_memory()
            if keep is not None and finished:
                keep.append((job.accelerator.unwrap_model(job.model).eval(), job.tokenizer, job.encoder))
            job.close()
    return metrics
