"""What a training run measures, and the figures it reports (metrics.train, metrics.memory, the
epoch projection, MFU and HFU), in one place beside the loop that feeds it.

- The measured window: in samples (measure.samples, measure.warmup_samples) every cell of a sweep
  measures the same samples whatever its micro-batch, accumulation or grouping (the sampler draws
  them: summ/data/sampler.py); in optimizer steps (measure.steps) for a single run.
- Memory by stretch: the steps as observed, the worst-case probe (one micro-batch at the training
  set's widest input and label), and evaluation, which never counts against the training budget.
  `peak_bytes` is the worst of observed and probe: what the budget, the reports and the sweepers use.
- The epoch projection: one epoch's exact padded positions (the sampler's order is known) at the
  measured cost, a time per step plus a time per padded position fitted over the measured steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch

from summ.config import Config, ModelKind
from summ.data.sampler import EpochSampler, Window
from summ.data.tokenize import Collator, TokenizedDataset
from summ.measure import flops, machine, timing
from summ.measure.memory import BudgetGuard, MemoryMonitor
from summ.modeling.loss import model_inputs, summed_token_loss
from summ.run_folder import MemoryFigures, RunMetrics, TrainFigures

log = logging.getLogger(__name__)


def window(cfg: Config, effective_batch: int) -> Optional[Window]:
    """The measured window in samples, each part rounded up to whole optimizer steps; None when
    the run is not measured in samples (measure.samples null)."""
    m = cfg.measure
    if m.samples is None:
        return None
    warmup = m.warmup_samples if m.warmup_samples is not None else m.warmup_steps * effective_batch
    return Window(warmup=math.ceil(warmup / effective_batch) * effective_batch,
                  measured=math.ceil(m.samples / effective_batch) * effective_batch)


def schedule_length(cfg: Config, updates_per_epoch: int, effective_batch: int) -> int:
    """Optimizer steps the run takes, by the first rule that applies: a window in samples
    (warm-up and measured steps), a window in steps (measure.warmup_steps + measure.steps),
    train.total_samples, train.max_steps, then train.epochs."""
    w = window(cfg, effective_batch)
    if w is not None:
        return (w.warmup + w.measured) // effective_batch
    if cfg.measure.steps:
        return cfg.measure.warmup_steps + cfg.measure.steps
    if cfg.train.total_samples:
        return max(1, round(cfg.train.total_samples / effective_batch))
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * updates_per_epoch


def warmup_steps(cfg: Config, effective_batch: int) -> int:
    w = window(cfg, effective_batch)
    return w.warmup // effective_batch if w is not None else cfg.measure.warmup_steps


def epoch_plan(dataset: TokenizedDataset, collator: Collator, cfg: Config, batch_size: int, accumulation: int,
               processes: int) -> tuple[int, int]:
    """(optimizer steps, padded positions) of one full epoch in the order a full run draws it
    (length grouping included), whatever window this run measures."""
    order = EpochSampler(dataset.lengths(), seed=cfg.train.seed, group_by_length=cfg.data.group_by_length,
                         batch_size=batch_size).order(0)
    inputs, labels = dataset.lengths(), dataset.label_lengths()
    batches = len(order) // batch_size
    positions = sum(collator.positions([inputs[j] for j in order[b * batch_size:(b + 1) * batch_size]],
                                       [labels[j] for j in order[b * batch_size:(b + 1) * batch_size]])
                    for b in range(batches))
    return batches // (accumulation * processes), positions


def probe_widths(dataset: TokenizedDataset) -> tuple[int, int]:
    """The widest input and label of the training set: a micro-batch of samples padded to both
    is the heaviest one an epoch can draw (a real batch is padded to its own longest)."""
    return max(dataset.lengths()), max(dataset.label_lengths())


def probe_samples(dataset: TokenizedDataset, n: int) -> list[int]:
    """The `n` samples with the most tokens, input and label together: padded to probe_widths
    they carry as many real label tokens as the worst batch (the loss's label rows grow with them)."""
    lengths, labels = dataset.lengths(), dataset.label_lengths()
    longest = sorted(range(len(lengths)), key=lambda i: lengths[i] + labels[i], reverse=True)
    return [longest[i % len(longest)] for i in range(n)]


class Measurement:
    """The loop's instruments: the step timer, the FLOP profile, memory by stretch, the machine."""

    def __init__(self, cfg: Config, monitor: MemoryMonitor, guard: BudgetGuard, warmup: int, device: torch.device):
        self.cfg, self.monitor, self.guard, self.device = cfg, monitor, guard, device
        self.timer = timing.StepTimer(warmup_steps=warmup)
        self.clock = timing.StepClock(device)
        self.micro = timing.MicroTimer(device)
        self.profile: Optional[flops.MicroStepProfile] = None
        self.observed_peak = 0  # the largest of the stretches run so far, the probe aside
        self.probe_peak: Optional[int] = None
        self.probe_skipped: Optional[str] = None  # why the probe cannot run under this launcher (launchers.py)
        self.eval_peak: Optional[int] = None
        self.load = machine.LoadWatch(device)
        self.loop_seconds: Optional[float] = None
        self.probe_seconds: Optional[float] = None
        self.step_positions: list[int] = []  # padded positions of each measured step

    def plan(self, metrics: RunMetrics, train_set_size: int) -> int:
        """The run's warm-up steps, given to the timer; the settings that change what its figures
        mean are said once in the log and kept in metrics.caveats (the reports repeat them)."""
        cfg, eff = self.cfg, metrics.effective_batch_size
        self.timer.warmup_steps = warmup_steps(cfg, eff)
        caveats = []
        if not cfg.measure.memory_probe:
            caveats.append("measure.memory_probe=false: peak memory is that of the batches measured, not of the "
                           "epoch's widest batch" + (f", so the memory budget ({cfg.measure.memory_budget_gb:g} GiB) "
                           f"is judged without it: a cell under budget here can run out in a full epoch"
                           if cfg.measure.memory_budget_gb else ""))
        w = window(cfg, eff)
        if w is not None and w.warmup + w.measured > train_set_size:
            caveats.append(f"the measured window (measure.samples: {w.measured} samples after {w.warmup} of warm-up) "
                           f"is larger than the {train_set_size} training samples: samples repeat, up to "
                           f"{math.ceil(w.measured / train_set_size)} times in the measured steps")
        elif w is None and cfg.measure.steps and (cfg.measure.warmup_steps + cfg.measure.steps) * eff > train_set_size:
            drawn = (cfg.measure.warmup_steps + cfg.measure.steps) * eff
            caveats.append(f"the measured steps (measure.warmup_steps + measure.steps, {drawn} samples) draw more than "
                           f"the {train_set_size} training samples: samples repeat, up to "
                           f"{math.ceil(drawn / train_set_size)} times")
        if (w is not None or cfg.measure.steps) and (cfg.train.max_steps or cfg.train.total_samples):
            caveats.append(f"{'train.max_steps' if cfg.train.max_steps else 'train.total_samples'} is not used: the "
                           f"measured window ({'measure.samples' if w is not None else 'measure.steps'}) sets this "
                           f"run's length")
        for text in caveats:
            log.warning("%s", text)
        metrics.caveats = caveats or None
        return self.timer.warmup_steps

    # ------------------------------------------------------------------ memory by stretch
    def worst_peak(self, current: int) -> int:
        """What the budget is checked against: the worst of the probe and every stretch so far."""
        return max(current, self.observed_peak, self.probe_peak or 0)

    def end_observed_stretch(self) -> None:
        self.observed_peak = max(self.observed_peak, self.monitor.segment())

    def end_probe(self) -> int:
        self.probe_peak = self.monitor.segment()
        return self.probe_peak

    def end_eval(self) -> None:
        self.eval_peak = self.monitor.segment()

    def memory_figures(self, process_peaks: Optional[list[int]]) -> MemoryFigures:
        self.monitor.settle()
        observed = max(self.observed_peak, self.monitor.peak_bytes() if self.eval_peak is None else 0)
        mine = max(observed, self.probe_peak or 0)
        peak = max(process_peaks) if process_peaks else mine  # the largest process's: what must fit on each device
        capacity = self.monitor.capacity_bytes()
        retries, ooms = self.monitor.pressure()
        return MemoryFigures(
            peak_bytes=peak, observed_peak_bytes=observed, probe_peak_bytes=self.probe_peak,
            eval_peak_bytes=self.eval_peak, reserved_peak_bytes=self.monitor.reserved_peak_bytes(),
            peak_bytes_per_process=process_peaks, weights_bytes=self.monitor.weights_bytes or None,
            context_bytes=self.monitor.context_bytes, alloc_retries=retries, num_ooms=ooms, capacity_bytes=capacity,
            fraction=peak / capacity if capacity else None, source=self.monitor.source,
            probe_skipped=self.probe_skipped,
            budget_bytes=self.guard.budget_bytes, limit_bytes=self.guard.limit_bytes,
            budget_source="measure.memory_budget_gb" if self.cfg.measure.memory_budget_gb else "device capacity")

    # ------------------------------------------------------------------ figures
    def train_figures(self, metrics: RunMetrics, final_loss: Optional[float], total_steps: int, processes: int,
                      epoch: Optional[tuple[int, int]]) -> TrainFigures:
        """metrics.train, and the run's epoch projection, MFU and HFU."""
        cfg = self.cfg
        t = TrainFigures(**self.timer.summary(), final_loss=final_loss, total_optimizer_steps=total_steps,
                         loop_seconds=self.loop_seconds, probe_seconds=self.probe_seconds)
        t.samples_per_s_per_process = t.samples_per_s / processes if t.samples_per_s else None
        t.tokens_per_s_per_process = t.tokens_per_s / processes if t.tokens_per_s else None
        if self.profile is not None:
            t.flops_per_token = self.profile.flops_per_token
            t.hardware_flops_per_position = self.profile.hardware_flops_per_position
            t.activation_bytes_first_micro_batch = self.profile.activation_bytes
        if epoch is not None:
            t.epoch_positions = epoch[1]
            metrics.epoch_seconds_projected = self.projected_seconds(*epoch)
        precision = flops.compute_precision(str(cfg.train.mixed_precision), str(cfg.model.quantization),
                                            str(cfg.model.dtype))
        peak = flops.peak_flops(self.device, precision, cfg.measure.peak_tflops)
        if peak and t.flops_per_token and t.tokens_per_s:
            metrics.mfu = t.flops_per_token * t.tokens_per_s / (peak * processes)
        if peak and t.hardware_flops_per_position and t.positions_per_s:
            metrics.hfu = t.hardware_flops_per_position * t.positions_per_s / (peak * processes)
        return t

    def projected_seconds(self, epoch_steps: int, epoch_positions: int) -> Optional[float]:
        """One epoch at the measured cost: seconds = a x steps + b x padded positions, fitted by
        least squares over the measured steps (a step's fixed cost, a position's cost); where the
        fit is not physical (a negative part) or the steps are too alike to separate the two, the
        measured positions/s alone."""
        times, positions = self.timer.step_times, self.step_positions
        if not times or not sum(positions):
            return None
        rate = sum(positions) / sum(times)
        n = len(times)
        mean_p, mean_t = sum(positions) / n, sum(times) / n
        sxx = sum((p - mean_p) ** 2 for p in positions)
        if n >= 3 and sxx > 0:
            b = sum((p - mean_p) * (t - mean_t) for p, t in zip(positions, times)) / sxx
            a = mean_t - b * mean_p
            if a >= 0 and b > 0:
                return a * epoch_steps + b * epoch_positions
        return epoch_positions / rate


_WARMED_PATHS = False


def warm_training_paths() -> None:
    """Once per process, before the first run's memory count: two training steps of a throw-away
    BART and Llama of toy size through the loop's own path (collator, loss, backward, clipping,
    fused AdamW, the FLOP counter's module tracker). The code pages, kernel caches and allocator
    arenas they bring in (about 10 MB on the CPU) would otherwise be charged to the first cell of a
    sweep or to a single run, and not to the cells after it."""
    global _WARMED_PATHS
    if _WARMED_PATHS:
        return
    from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    from summ.data.tokenize import Features

    state = torch.get_rng_state()
    small = dict(vocab_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    bart = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, **small))
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, **small))
    for model, kind in ((bart, ModelKind.seq2seq), (llama, ModelKind.causal)):
        collate = Collator(0, kind, 2)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        for step in range(2):
            lengths = torch.randint(6, 20, (3,)).tolist()
            features = [Features(torch.randint(3, 96, (n,)).tolist(), torch.randint(3, 96, (n,)).tolist(), 0)
                        for n in lengths]
            if kind == ModelKind.causal:
                features = [Features(f.input_ids, [-100] * 3 + f.labels[3:], 3) for f in features]
            batch = collate(features)
            with flops.ProfileMicroStep(model, positions=sum(batch["counts"][1:3])) if step == 0 else contextlib.nullcontext():
                logits = model(**model_inputs(batch)).logits
                summed_token_loss(logits, batch["labels"], kind, label_tokens=batch["counts"].label_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    _WARMED_PATHS = True


def probe_memory(accelerator, model, optimizer, batch: dict, kind, meas: "Measurement") -> int:
    """One micro-batch at the training set's widest input and label, forward and backward, no
    update and no trace left (gradients dropped, every RNG restored): the memory of the worst
    batch an epoch can draw, which a few measured batches rarely meet. Returns its peak."""
    meas.end_observed_stretch()
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        logits = model(**model_inputs(batch)).logits
        labels = batch["counts"].label_tokens
        accelerator.backward(summed_token_loss(logits, batch["labels"], kind, label_tokens=labels) / max(labels, 1))
        del logits
    finally:
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    return meas.end_probe()
