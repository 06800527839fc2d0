"""The figures a run reports, as the run's metrics record holds them: what the measured steps cost
(`TrainFigures`, with the phases a step is split into), and the run's memory (`MemoryFigures`,
with the training peak by part, `MemoryComponents`). summ/run_folder.py writes and reads them in
the run's record; the measurement code that fills each is named beside it."""

from __future__ import annotations

from dataclasses import dataclass

# The phases of a step, in the order the loop meets them (summ/training/loop.py marks each end,
# summ/measure/timing.py: StepClock times them):
# data: the next micro-batches from the loader and their counts; copy: host to device;
# forward: the model and the loss; backward: gradients, recompute under checkpointing and DDP's
# overlapped all-reduce included; optimizer: clipping, the step, zeroing, the schedule;
# collectives: the loss's reduction (the step's one read-back: on a GPU, its wait) and the
# processes' agreement; bookkeeping: the rest (checks, the history row, progress).
PHASES = ("data", "copy", "forward", "backward", "optimizer", "collectives", "bookkeeping")


@dataclass
class TrainFigures:
    """What the measured optimizer steps cost (summ/measure/timing.py defines each figure)."""

    optimizer_steps: int = 0  # measured steps (warm-up excluded)
    micro_steps: int = 0
    warmup_optimizer_steps: int = 0
    total_optimizer_steps: int = 0  # every step the run took (a resumed run counts from its checkpoint)
    samples: int = 0  # in the measured steps, all processes
    tokens: int = 0  # non-pad tokens the model read in the measured steps
    pad_tokens: int = 0
    pad_fraction: float | None = None
    seconds: float = 0.0  # wall time of the measured steps, bookkeeping included
    loop_seconds: float | None = None  # wall time of the whole training loop, warm-up and bookkeeping included
    probe_seconds: float | None = None  # the memory probe's wall time (between steps: in loop_seconds only)
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    seconds_per_sample: float | None = None
    seconds_per_token: float | None = None
    samples_per_s_interval: list | None = None  # [q1, q3] of the per-step rates: the noise next to a 5% rule
    samples_per_s_per_process: float | None = None
    tokens_per_s_per_process: float | None = None
    step_time_s_median: float | None = None
    step_time_s_p90: float | None = None
    micro_step_time_s_median: float | None = None
    max_micro_batch_positions: int = 0  # padded positions of the largest micro-batch measured
    positions_per_s: float | None = None  # padded positions (real + pad) per second
    epoch_positions: int | None = None  # padded positions of one epoch in the sampler's exact order
    flops_per_token: float | None = None  # model FLOPs per non-pad token, forward and backward, no recompute
    hardware_flops_per_position: float | None = None  # as executed: recompute included, per padded position
    activation_bytes_first_micro_batch: int | None = None  # tensors saved for backward, parameters excluded
    # the measured steps' seconds by phase (PHASES above), summing to `seconds`
    phase_seconds: dict | None = None
    # train.compile: torch.compile's seconds over the run (its warm-up before the loop: none in a
    # measured step where recompiles is 0), and the compilations inside the measured steps
    compile_seconds: float | None = None
    recompiles: int | None = None
    final_loss: float | None = None


@dataclass
class MemoryComponents:
    """The training peak by part (summ/measure/components.py): counted from the tensors, except
    activations, the peak's rest above weights, gradients and optimizer state."""

    weights_bytes: int | None = None  # parameters and buffers, quantization state included
    weights_bytes_by_storage: dict | None = None  # {"4bit", "8bit", "16bit", "32bit": bytes}
    trainable_bytes: int | None = None  # the parameters the optimizer updates (a part of the weights)
    gradients_bytes: int | None = None  # after the optimizer's first step, before they are dropped
    optimizer_state_bytes: int | None = None  # its state tensors on the device after its first step
    activations_bytes: int | None = None  # activations and temporaries: peak - weights - gradients - optimizer state
    logits_bytes: int | None = None  # the largest micro-batch's logits: micro-batch x positions x vocabulary x bytes
    logits_shape: list | None = None  # [micro-batch, positions, vocabulary] of those logits
    loss_float32_rows_bytes: int | None = None  # the loss's float32 rows: label positions x vocabulary x 4
    allocator_reserve_bytes: int | None = None  # CUDA: reserved beyond allocated at their peaks
    context_bytes: int | None = None  # CUDA: the context and other processes' memory at start
    eval_peak_bytes: int | None = None  # evaluation and generation, a stretch of its own
    kv_cache_bytes: int | None = None  # generation's key/value cache at its longest: sequences x beams x layers


@dataclass
class MemoryFigures:
    """Peak memory of the run: bytes above the run's own baseline unless named otherwise."""

    peak_bytes: int = 0  # the worst of observed and probe: what the budget, the report and the sweeper use
    observed_peak_bytes: int = 0  # during the steps that ran
    probe_peak_bytes: int | None = None  # one micro-batch at the maximum widths (measure.memory_probe)
    probe_skipped: str | None = None  # why the probe did not run under this launcher (DeepSpeed, FSDP)
    probe_positions: int | None = None  # the probe's micro-batch: padded positions (real + pad)
    eval_peak_bytes: int | None = None  # evaluation and generation; never judged against the budget
    reserved_peak_bytes: int | None = None  # the allocator's reserved peak (CUDA) or resident set (CPU)
    peak_bytes_per_process: list | None = None
    weights_bytes: int | None = None  # the model as loaded; a model kept loaded across a sweep counts it here
    context_bytes: int | None = None  # CUDA context and other processes' memory on the device at start
    alloc_retries: int | None = None  # the CUDA allocator freed its cache to satisfy a request: memory pressure
    num_ooms: int | None = None
    capacity_bytes: int | None = None
    fraction: float | None = None  # peak_bytes of capacity_bytes
    budget_bytes: int | None = None
    budget_source: str | None = None  # "measure.memory_budget_gb", or "device capacity" when none was set
    limit_bytes: int | None = None  # budget x headroom
    source: str = ""  # how it was measured (cuda_max_memory_allocated, cpu_peak_rss_above_baseline, ...)
    components: MemoryComponents | None = None  # the training peak by part
