"""One training run: Job.setup builds the run's parts (summ/training/setup.py) in the order their
memory is counted, Job.train runs the Accelerate loop (gradient accumulation, clipping, mixed
precision) with its instruments kept outside the step (summ/training/instruments.py), then the model
is saved and evaluated (summ/training/after_training.py). Every outcome ends in the run's metrics
record (summ/training/outcome.py); the process is left clean for the next job of a sweep."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import torch

from summ import failpoints
from summ.config import Config
from summ.data.tokenize import Encoder
from summ.distributed import sharded_by
from summ.errors import ConfigError, Interrupted
from summ.inference import backends
from summ.measure.memory import release_memory
from summ.modeling import models
from summ.modeling.loss import model_inputs, summed_token_loss
from summ.modeling.saved import save_for_predict
from summ.run_folder import MODEL_DIR, RunMetrics
from summ.training import batches, checkpoint, cleanup, compiled, launchers, optimizers, processes, reuse, tracking
from summ.training.after_training import evaluate_trained
from summ.training.instruments import MemoryStretches, StepInstruments, Timing
from summ.training.outcome import StepLog, recorded
from summ.training.prepare import PreparedData, data_for
from summ.training.probe import probe_batches, probe_memory, warm_training_paths
from summ.training.schedule import caveats
from summ.training.setup import Setup, copy_in_the_step, lr_scheduler, prepared_parts, schedule, start_accelerator
from summ.training.trace import check_warmup

log = logging.getLogger(__name__)


class Job:
    """One training run's state, held in one place so that close() can drop every reference: what it
    was given, the parts setup built (`run`), its instruments, and where it is in its schedule."""

    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        metrics: RunMetrics,
        identity: str,
        tracking_names: tuple[str, str | None] | None = None,
        reuse_loaded: bool = False,
    ):
        self.cfg, self.output_dir, self.metrics = cfg, output_dir, metrics
        self.identity = identity  # what a checkpoint must match to be resumed (checkpoint.identity)
        self.tracking_names = tracking_names or (output_dir.name, None)  # (run, sweep group)
        self.reuse_loaded = reuse_loaded  # share data and model with the sweep's other cells (summ/training/reuse.py)
        self.reused = {"data": False, "model": False}
        self.steps = StepLog()  # the history rows and the tracker
        self.stop = checkpoint.StopRequest()  # SIGINT / SIGTERM while training
        self.accelerator = None
        self.memory: MemoryStretches | None = None  # from the start of the memory count
        self.timing: Timing | None = None  # from the schedule (its warm-up) on
        self.loaded: models.LoadedModel | None = None  # the model until the Accelerator prepares it
        self.kept: reuse.KeptModel | None = None  # a sweep's loaded model, given back at close()
        self.run: Setup | None = None
        self.start_step, self.position = 0, {"epoch": 0, "batches": 0}  # a resumed run's, then the loop's
        self.process_peaks: list[int] | None = None
        self._backend = None
        self.compiled: tuple | None = None  # train.compile: (the model compiled in place, its CompileWatch)

    def run_stages(self) -> None:
        """Setup, training, the saved model, evaluation, and every process's peak."""
        run = self.setup()
        with self.stop.installed():
            self.train(run)
        self.save(run)
        self.evaluate(run)
        self.gather_peaks(run)

    # ------------------------------------------------------------------ setup, step by step
    def setup(self) -> Setup:
        """The run's parts, in the order memory is counted: the Accelerator and the data before the
        count (with a sweep's kept model), then the model, optimizer state and activations."""
        from accelerate.utils import set_seed

        cfg, m = self.cfg, self.metrics
        m.phase = "setup"
        acc, shape = start_accelerator(cfg, self.output_dir, m)
        self.accelerator = acc
        self.steps.tracking = tracking.start(acc, cfg.tracking, cfg, *self.tracking_names)
        set_seed(cfg.train.seed)
        m.phase = "load"
        data, tokenizer, encoder = self._prepare_data()
        base = self._kept_model(tokenizer) if self.reuse_loaded and acc.num_processes == 1 else None
        warm_training_paths()
        skipped = launchers.probe_skipped(acc) if cfg.measure.memory_probe else None
        self.memory = MemoryStretches(cfg, acc.device, skipped)  # counted from here: model, optimizer, activations
        self.loaded = self._load_model(base, tokenizer, data)
        parts = prepared_parts(cfg, acc, self.loaded, data, tokenizer, encoder, shape)
        if cfg.train.compile:  # in place, compiled at its first calls: the warm-up (summ/training/compiled.py)
            self.compiled = acc.unwrap_model(parts.model), compiled.CompileWatch()
            compiled.compile_model(self.compiled[0], str(cfg.train.compile_mode))
        m.optimizer = optimizers.said(parts.optimizer)
        plan = schedule(cfg, data, parts.collator, shape)
        if cfg.measure.profile:
            check_warmup(plan.warmup_steps)
        m.caveats = self._caveats(max(1, round(plan.samples_per_step)), len(data.train_ds))
        self.timing = Timing(plan.warmup_steps, acc.device, phases=cfg.measure.phase_timing)
        self.timing.compile_watch = self.compiled and self.compiled[1]
        scheduler = lr_scheduler(cfg, acc, parts.optimizer, plan.total_steps)
        copy_to = copy_in_the_step(parts.train_loader)
        self.run = Setup(acc, *parts, scheduler, data, tokenizer, encoder, cfg.model.kind, shape, plan, copy_to)
        self.loaded = None
        self._resume(plan.total_steps)
        self._say_plan(self.run)
        return self.run

    def backend(self):
        """The generation backend (back-translation, paraphrase), built on first use, or None."""
        if self._backend is None:
            self._backend = backends.build(self.cfg.generation, Path(self.cfg.generation.cache_dir), self.cfg.solar)
        return self._backend

    def _prepare_data(self) -> tuple[PreparedData, object, Encoder]:
        cfg = self.cfg
        data, tokenizer, encoder, self.reused["data"] = data_for(
            cfg, self.backend, self.output_dir if self.accelerator.is_main_process else None, self.reuse_loaded
        )
        self.metrics.augmentation, self.metrics.data_quality = data.augmentation, data.data_quality
        models.preimport(cfg.model)  # imported code is not the run's memory
        return data, tokenizer, encoder

    def _kept_model(self, tokenizer):
        """The sweep's loaded model for this config (a cell on one process: a sharded or
        several-process launch wraps the model for good), on the device before the cell's memory
        count starts (the count adds its weights)."""
        self.kept, self.reused["model"] = reuse.kept_base(self.cfg, tokenizer, self.accelerator.device)
        if self.accelerator.is_main_process:
            log.info(
                "sweep.reuse_loaded: %s",
                ", ".join(
                    f"{what} {'reused from an earlier cell' if hit else 'loaded'}" for what, hit in self.reused.items()
                ),
            )
        return self.kept.model

    def _load_model(self, base, tokenizer, data: PreparedData) -> models.LoadedModel:
        cfg, m = self.cfg, self.metrics
        if base is not None:
            self.memory.monitor.weights_bytes = self.kept.weights_bytes
            loaded = models.with_adapters(cfg.model, base, tokenizer, cfg.train.seed)
        else:
            loaded = models.load(cfg.model, tokenizer, cfg.train.seed, self.accelerator.device)
        m.reused = self.reused if self.reuse_loaded else None
        m.trainable_params, m.total_params = loaded.trainable_params, loaded.total_params
        m.attention = models.attention_built(loaded.model)
        m.train_set_size, m.eval_set_size = len(data.splits.train), len(data.splits.dev)
        return loaded

    def _caveats(self, effective_batch: int, train_set_size: int) -> list[str] | None:
        """Said once in the log; metrics.caveats keeps them for the reports."""
        found = caveats(self.cfg, effective_batch, train_set_size)
        for text in found:
            log.warning("%s", text)
        return found or None

    def _resume(self, total_steps: int) -> None:
        if not self.cfg.train.resume_from:
            return
        ckpt = checkpoint.resolve(self.cfg.train.resume_from, self.output_dir)
        self.position, self.steps.history = checkpoint.load(self.accelerator, ckpt, self.identity)
        self.start_step = self.position.pop("step")
        self.metrics.resumed_from = {"checkpoint": str(ckpt), "step": self.start_step}
        if self.start_step >= total_steps:
            raise ConfigError(
                f"{ckpt} is at step {self.start_step}, the end of this run's {total_steps} steps: nothing to resume"
            )
        log.info("resuming from %s at optimizer step %d (epoch %d)", ckpt, self.start_step, self.position["epoch"])

    def _say_plan(self, run: Setup) -> None:
        m, shape, plan = self.metrics, run.shape, run.schedule
        if run.accelerator.is_main_process:
            model = f"model {self.cfg.model.name} ({run.kind}): {m.trainable_params:,} trainable of {m.total_params:,}"
            batch = shape.text() + ("" if shape.effective else f" (a mean {plan.samples_per_step:.1f} samples a step)")
            steps = f"{plan.epoch.optimizer_steps} per epoch of {len(run.data.train_ds)} samples"
            line = f"{model} parameters | device {m.device} x{shape.processes} | {batch} | {plan.total_steps} optimizer"
            log.info("%s steps (%s)", line, steps)

    # ------------------------------------------------------------------ training
    def train(self, run: Setup) -> None:
        """Each optimizer step: forward and backward per micro-batch, clip and step at the last, zero,
        then the step's checks and figures (StepInstruments) and, between steps, a checkpoint. The
        clock marks the end of each phase (summ/measure/timing.py: PHASES)."""
        acc, plan, clock = run.accelerator, run.schedule, self.timing.clock
        self.metrics.phase = "train"
        run.model.train()
        groups = batches.accumulation_groups(
            run.train_loader,
            run.shape.accumulation,
            self.position["epoch"],
            self.position["batches"],
            resumed=self.start_step > 0,
        )
        instruments = StepInstruments(acc, self.timing, self.memory, plan, self.start_step, self.cfg, self.output_dir)
        self.memory.count_components(acc.unwrap_model(run.model), run.optimizer)
        loss = None
        try:
            if self.compiled:  # then the clock restarts: the first step is not billed for it
                compiled.warm_up_compiled(run, self.timing, self.memory, self.compiled[1])
                instruments.between_steps()
            for step in range(self.start_step, plan.total_steps):
                if step == plan.warmup_steps:  # between warm-up and the measured steps: the worst batch's memory
                    if self.cfg.measure.memory_probe and not self.memory.probe_skipped:
                        self._probe(run)
                    instruments.measured_steps_start()
                instruments.step_starts(step)
                epoch, micro_batches, self.position = next(groups)
                counts = processes.step_counts(acc, micro_batches)
                instruments.data_ready()
                loss_sum, failed = torch.zeros((), device=acc.device), None
                for micro, batch in enumerate(micro_batches):
                    with acc.accumulate(run.model):
                        part, failed = self._micro_step(run, batch, counts.label_tokens, step, micro, failed)
                    loss_sum += part
                    instruments.micro_step_done()
                run.scheduler.step()
                clock.mark("optimizer")
                loss = float(acc.reduce(loss_sum, reduction="sum")) / max(counts.label_tokens, 1)  # the one sync
                clock.mark("collectives")
                lr, signal = run.scheduler.get_last_lr()[0], self.stop.signum or 0
                row, signum = instruments.step_ends(step, epoch, loss, lr, counts, micro_batches, signal, failed)
                self.steps.add(row)
                if self._maybe_checkpoint(step + 1, signum, plan.total_steps):
                    instruments.between_steps()
        finally:
            if self.compiled:  # evaluation runs eagerly
                compiled.forget(self.compiled[0])
            instruments.loop_ends()
            self.metrics.profile = instruments.trace and instruments.trace.files
            self._record_train(run, loss)

    def where(self, step: int, micro_step: int | None = None) -> failpoints.Where:
        """This cell and optimizer step (from 1) as the failpoints filter them (summ/failpoints.py)."""
        shape = self.run.shape
        return failpoints.Where(
            micro_batch=shape.micro_batch, accumulation=shape.accumulation, step=step, micro_step=micro_step
        )

    def _micro_step(
        self, run: Setup, batch: dict, step_label_tokens: int, step: int, micro: int, failed: processes.Failure | None
    ) -> tuple[torch.Tensor, processes.Failure | None]:
        """Forward and backward, then the update where the micro-step syncs. A process that failed
        earlier in this step (several processes) still takes its part in the step's collectives: a
        stand-in for the gradient all-reduce, the clip; then it drops its gradients. Returns (this
        micro-step's summed loss, this process's failure in the step so far)."""
        acc, part = run.accelerator, None
        batch = run.on_device(batch)
        self.timing.clock.mark("copy")
        if failed is None:
            try:
                with self.timing.profiled(run.model, batch):
                    part = self._forward_backward(run, batch, step_label_tokens, step, micro)
            except Exception as exc:  # the others go on to the step's collectives: so must this one
                if (failed := processes.shared_failure(acc, exc)) is None:
                    raise
        if failed is not None:  # out of the except block: the failed step's tensors are freed
            part = processes.stand_in(acc, run.model, batch, acc.sync_gradients)
        try:
            self._update(run, step, failed=failed is not None)
        except Exception as exc:
            if (failed := processes.shared_failure(acc, exc)) is None:
                raise
        return part, failed

    def _forward_backward(self, run: Setup, batch: dict, step_label_tokens: int, step: int, micro: int) -> torch.Tensor:
        acc = run.accelerator
        where = self.where(step + 1, micro + 1)
        with failpoints.inside_forward(lambda: acc.unwrap_model(run.model), "forward", where):
            logits = run.model(**model_inputs(batch)).logits
        failpoints.inside_backward(logits, where)
        loss_sum = summed_token_loss(
            logits, batch["labels"], run.kind, self.cfg.train.label_smoothing, batch["counts"].label_tokens
        )
        self.timing.clock.mark("forward")
        # Normalise by the label tokens of the whole step on all processes. Accelerate divides
        # by the accumulation steps and DDP averages over processes: undo both.
        acc.backward(loss_sum * (run.shape.accumulation * acc.num_processes / max(step_label_tokens, 1)))
        self.timing.clock.mark("backward")
        return loss_sum.detach()

    def _update(self, run: Setup, step: int, failed: bool) -> None:
        """Clip and step at the micro-step that syncs (Accelerate's optimizer skips the others).
        `failed`: this process failed earlier in this step; it still clips (a collective where
        parameters are sharded), then only drops its gradients."""
        acc = run.accelerator
        if acc.sync_gradients:
            if not failed:
                failpoints.hit("optimizer", self.where(step + 1))
            if self.cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(run.model.parameters(), self.cfg.train.max_grad_norm)
        if not failed:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        self.timing.clock.mark("optimizer")

    def _probe(self, run: Setup) -> None:
        """The worst batch's memory, between warm-up and the measured steps (summ/training/probe.py):
        one micro-batch, or a token budget's few worst cases, each judged against the budget."""
        timing, worst = self.timing, -1
        timing.clock.start()
        for batch in probe_batches(run.data.train_ds, run.shape, run.collator):
            peak, counts = self._probe_batch(run, batch), batch["counts"]
            if peak > worst:
                worst, self.memory.probe_positions = peak, counts.tokens + counts.pad_tokens
            if self.memory.count is not None:
                self.memory.count.saw_label_rows(counts.label_tokens)
            widths = (batch["input_ids"].shape[1], batch["labels"].shape[1])
            log.info(
                "memory probe: a micro-batch of %d at widths %s peaked at %.3f GiB",
                counts.samples,
                widths,
                peak / 2**30,
            )
        timing.probe_seconds = timing.clock.lap()  # its work done on the device

    def _probe_batch(self, run: Setup, batch: dict) -> int:
        """One probe micro-batch's peak, checked against the budget on every process."""
        acc, peak, failed = run.accelerator, 0, None
        # no gradient all-reduce (no_sync): nothing for the other processes to wait in
        where = self.where(run.schedule.warmup_steps + 1)
        try:
            with acc.no_sync(run.model), failpoints.inside_forward(lambda: acc.unwrap_model(run.model), "probe", where):
                peak = probe_memory(acc, run.model, run.optimizer, batch, run.kind, self.memory)
        except Exception as exc:
            if (failed := processes.shared_failure(acc, exc)) is None:
                raise
        self.memory.guard.check(processes.agree(acc, self.memory.worst_peak(peak), 0, failed, "the memory probe")[0])
        return peak

    def _maybe_checkpoint(self, done: int, signum: int, total_steps: int) -> bool:
        """After optimizer step `done`: a checkpoint every train.save_every_steps, and on a stop
        signal a checkpoint then Interrupted. A signal in the last step lets the run finish.
        True when a checkpoint was written."""
        every, last = self.cfg.train.save_every_steps, done >= total_steps
        if (signum and not last) or (every and done % every == 0 and not last):
            failpoints.hit("save", self.where(done))
            acc, history, keep = self.accelerator, self.steps.history, self.cfg.train.keep_checkpoints
            stopping = bool(signum)
            path = checkpoint.save(acc, self.output_dir, done, self.position, history, keep, self.identity, stopping)
            if signum:
                raise Interrupted(signum, done, path)
            return True
        return False

    def _record_train(self, run: Setup, final_loss: float | None) -> None:
        m, timing = self.metrics, self.timing
        m.machine = timing.load.finish() if timing.timer.measured_steps else None
        steps = self.start_step + timing.timer.steps_seen
        r = timing.train_figures(self.cfg, final_loss, steps, run.shape.processes, run.schedule.epoch)
        m.train, m.epoch_seconds_projected, m.mfu, m.hfu = r.train, r.epoch_seconds_projected, r.mfu, r.hfu

    # ------------------------------------------------------------------ after training
    def save(self, run: Setup) -> None:
        """What mode=predict needs (weights or the LoRA adapter, tokenizer, config) in <run dir>/model."""
        if not self.cfg.train.save_model:
            return
        self.metrics.phase = "save"
        failpoints.hit("save", self.where(self.start_step + self.timing.timer.steps_seen))
        acc = run.accelerator  # sharded weights are gathered by every process together (a collective)
        weights = acc.get_state_dict(run.model) if sharded_by(acc) == "fsdp" else None
        if acc.is_main_process:
            save_for_predict(acc, run.model, run.tokenizer, self.cfg, self.output_dir / MODEL_DIR, weights)
        acc.wait_for_everyone()  # the saved model is complete before any process reads it

    def evaluate(self, run: Setup) -> None:
        """metrics.eval; evaluation's memory is its own stretch, never judged against the training budget."""
        if not self.cfg.eval.enabled or not run.data.splits.dev:
            return
        self.metrics.phase = "eval"
        self.memory.end_observed_stretch()
        self.metrics.eval = evaluate_trained(
            self.cfg, run, self.output_dir, self.backend, self.where(run.schedule.total_steps)
        )
        self.memory.end_eval()

    def gather_peaks(self, run: Setup) -> None:
        """Every process's worst peak (a collective: only on the path all processes reach)."""
        if run.shape.processes > 1:
            mine = self.memory.figures(None).peak_bytes
            tensor = torch.tensor([mine], dtype=torch.int64, device=run.accelerator.device)
            self.process_peaks = [int(x) for x in run.accelerator.gather(tensor).cpu()]

    def record_memory(self) -> None:
        if self.memory is not None:
            self.metrics.memory = memory = self.memory.figures(self.process_peaks)
            if memory.components is not None and self.metrics.eval:  # generation's, computed where it ran
                memory.components.kv_cache_bytes = self.metrics.eval.get("kv_cache_bytes")

    def trained(self) -> tuple:
        """(model, tokenizer, encoder) of the trained run, for a K-fold logit ensemble."""
        run = self.run
        return self.accelerator.unwrap_model(run.model).eval(), run.tokenizer, run.encoder

    def close(self) -> None:
        """Drop everything the run holds, so that the next cell of a sweep starts as a fresh process
        would. Called while an error that ended the run may still be on its way out: the frames
        its traceback holds (the failed step's batch, logits and graph, the optimizer and loader
        they reach) are cleared first, or nothing below could free them."""
        cleanup.clear_frames(sys.exc_info()[1])
        if self.compiled:  # nothing compiled for this cell runs in the next
            self.compiled[1].close()
            compiled.forget(self.compiled[0])
        if self.memory is not None:
            self.memory.stop()
        if self.kept is not None:  # back to its kept form for the next cell
            model = self.run.model if self.run is not None else (self.loaded.model if self.loaded else None)
            if model is not None:
                reuse.give_back(self.kept, self.accelerator.unwrap_model(model, keep_fp32_wrapper=False))
        if self.accelerator is not None:
            self.accelerator.free_memory()
        self.run = self.accelerator = self.loaded = self.memory = None
        cleanup.reset_accelerate()
        release_memory()
        if self.reuse_loaded:  # what outlives the cell (imported code, kept data) leaves the collector's walks
            gc.freeze()


def run_training(
    cfg: Config,
    output_dir: Path,
    metrics: RunMetrics,
    identity: str,
    keep: list | None = None,
    tracking_names: tuple[str, str | None] | None = None,
    reuse_loaded: bool = False,
) -> RunMetrics:
    """One training run, recorded in `metrics` and in the run folder whatever happens (a UserError
    or an interruption is raised again after the write). `keep`, a list, receives the trained model
    with its tokenizer and encoder (a K-fold logit ensemble decodes with them). `reuse_loaded`: a
    sweep's cell, sharing data and model with the process's other cells."""
    job = Job(cfg, output_dir, metrics, identity, tracking_names, reuse_loaded and keep is None)
    with recorded(metrics, output_dir, job.steps):
        try:
            job.run_stages()
            if keep is not None:
                keep.append(job.trained())
        finally:
            job.record_memory()
            job.close()
    return metrics
