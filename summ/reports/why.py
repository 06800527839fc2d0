"""Why a sweep's knee is where it is: one sentence per step of the grid, built from the figures.

A step is a doubling of the micro-batch at fixed accumulation, or a split of a fixed effective
batch into larger micro-batches and fewer accumulation steps. Each sentence gives how the per-sample
cost changed and its cause, ranked by the evidence the cells carry:
1. memory pressure: allocator retries or out-of-memory events, or a peak within 10% of the
   budget (knee.pressure_evidence), naming the memory components that grew (memory.components);
2. padding: the share of padded positions grew with the micro-batch;
3. a phase that grew faster than the work: its seconds per sample rose and carry most of the rise
   (backward with recompute, the optimizer step no longer amortised, data loading starved);
4. compute saturated: MFU (or, without it, samples/s) flat while the micro-batch grew.
A step that got cheaper per sample is explained by what it amortised: the fixed cost of a step (or
of a micro-step, for a split) solved from the two cells' step times, and the phases whose time per
sample fell. A slowdown with none of this evidence says so rather than guess.
Pure functions of the cells: recorded tables replay exactly (tests/test_why.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from summ.reports.cells import Cell
from summ.reports.knee import padding_remedy, pressure_evidence
from summ.reports.summary import size_text

GROWN = (  # the components that grow with the micro-batch, as the sentence names them
    ("activations_bytes", "activations"),
    ("logits_bytes", "logits"),
    ("loss_float32_rows_bytes", "the loss's float32 rows"),
    ("allocator_reserve_bytes", "the allocator's reserve"),
)
PAD_GROWTH = 0.05  # a rise of the padded share of positions, in points, that counts as evidence
PHASE_SHARE = 0.5  # a phase carrying at least this share of a per-sample rise is its cause


@dataclass
class GridStep:
    """Two ok cells of one series: `small` then `large` (the larger micro-batch)."""

    small: Cell
    large: Cell
    kind: str  # "doubling" (fixed accumulation) or "split" (fixed effective batch)

    @property
    def cost_change(self) -> float:
        """Per-sample cost of `large` over `small`, minus one (+0.21: 21% dearer per sample)."""
        return self.small.samples_per_s / self.large.samples_per_s - 1

    def title(self) -> str:
        s, c = self.small, self.large
        if self.kind == "doubling":
            size = "batch.max_tokens" if s.by_tokens else "micro-batch"
            return f"{size} {s.micro} -> {c.micro} at accumulation {s.gradient_accumulation_steps}"
        what = f"{s.per_step[1]} tokens a step" if s.by_tokens else f"effective batch {s.effective_batch_size}"
        return f"{what} as {s.split_text} -> {c.split_text}"


def grid_steps(cells: list[Cell]) -> list[GridStep]:
    """Every doubling at fixed accumulation and every split of a fixed effective batch between ok
    cells of the same other settings, smaller micro-batch first."""
    series: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if c.ok and c.micro and c.gradient_accumulation_steps:
            series[("doubling", c.by_tokens, c.gradient_accumulation_steps, c.other_settings())].append(c)
            series[("split", c.per_step, c.other_settings())].append(c)
    steps = []
    for (kind, *_), members in series.items():
        members.sort(key=lambda c: c.micro)
        steps += [GridStep(a, b, kind) for a, b in zip(members, members[1:]) if a.micro < b.micro]
    return sorted(steps, key=lambda s: (s.kind, s.small.by_tokens, s.small.gradient_accumulation_steps, s.small.micro))


def why_lines(cells: list[Cell], tolerance: float, settings: Callable[[Cell], str] | None = None) -> list[str]:
    """One sentence per step of the grid (grid_steps); `settings` names a cell's other settings
    where they vary across the sweep (the series they tell apart)."""
    lines = []
    for step in grid_steps(cells):
        label = settings(step.small) if settings else ""
        lines.append(f"{step.title()}{f' ({label})' if label else ''}: {explain(step, tolerance)}")
    return lines


def explain(step: GridStep, tolerance: float) -> str:
    change = step.cost_change
    cost = (
        f"{_ms(step.small.seconds_per_sample)} -> {_ms(step.large.seconds_per_sample)} ms per sample"
        if step.small.seconds_per_sample and step.large.seconds_per_sample
        else f"{step.small.samples_per_s:.3g} -> {step.large.samples_per_s:.3g} samples/s"
    )
    if change > tolerance:
        return f"per-sample cost rose {change:.0%} ({cost}); {_slower_cause(step)}."
    if change < -tolerance:
        return f"per-sample cost fell {-change:.0%} ({cost}); {_amortised(step)}."
    return f"per-sample cost about the same ({change:+.0%}, {cost}); {_flat_cause(step)}."


def _slower_cause(step: GridStep) -> str:
    """The first cause the figures carry evidence for, in the module's order."""
    small, large = step.small, step.large
    evidence = pressure_evidence(large)
    if evidence:
        return f"memory pressure ({evidence}){_grown_text(small, large)}"
    if small.pad_fraction is not None and large.pad_fraction is not None:
        if large.pad_fraction > small.pad_fraction + PAD_GROWTH:
            return (
                f"padding: {small.pad_fraction:.0%} -> {large.pad_fraction:.0%} of the positions were padding "
                f"({padding_remedy(large)})"
            )
    phase = _phase_that_grew(step)
    if phase:
        return phase
    return (
        "no cause found in the figures (no allocator retries or peak near the budget, no growth in "
        "padding, no phase that grew faster than the work)"
    )


def _grown_text(small: Cell, large: Cell) -> str:
    grown = []
    for key, name in GROWN:
        a, b = small.part_bytes(key), large.part_bytes(key)
        if a is not None and b is not None and b > a * 1.1:
            grown.append(f"{name} {size_text(a)} -> {size_text(b)}")
    if grown:
        return ", as " + ", ".join(grown) + " grew"
    if small.peak_bytes and large.peak_bytes:
        return f", as the peak grew {size_text(small.peak_bytes)} -> {size_text(large.peak_bytes)}"
    return ""


PHASE_WORDS = {
    "data": "data loading starved the step",
    "copy": "the host-to-device copy grew",
    "forward": "the forward pass grew faster than the work",
    "backward": "the backward pass grew faster than the work",
    "optimizer": "the optimizer step is no longer amortised",
    "collectives": "the collectives (and the step's wait on the device) grew",
    "bookkeeping": "the loop's bookkeeping grew",
}


def _phase_deltas(step: GridStep) -> dict[str, tuple[float, float]]:
    """Per phase: seconds per sample in `small` and in `large`."""
    out = {}
    for phase in (step.small.phase_seconds or {}).keys() & (step.large.phase_seconds or {}).keys():
        a, b = step.small.phase_per_sample(phase), step.large.phase_per_sample(phase)
        if a is not None and b is not None:
            out[phase] = (a, b)
    return out


def _phase_that_grew(step: GridStep) -> str | None:
    deltas = _phase_deltas(step)
    rise = sum(b - a for a, b in deltas.values())
    if not deltas or rise <= 0:
        return None
    phase, (a, b) = max(deltas.items(), key=lambda kv: kv[1][1] - kv[1][0])
    if b - a < PHASE_SHARE * rise:
        return None
    words = PHASE_WORDS[phase]
    if phase == "backward" and step.large.gradient_checkpointing:
        words = "the backward pass, its recompute included, grew faster than the work"
    return f"{words}: {phase} {_ms(a)} -> {_ms(b)} ms per sample"


def _amortised(step: GridStep) -> str:
    """What a cheaper sample came from: a fixed cost per step (doubling) or per micro-step (split)
    solved from the two step times, and the phases whose time per sample fell most."""
    small, large = step.small, step.large
    parts = []
    fixed = _fixed_cost(step)
    if fixed is not None:
        per, seconds, share = fixed
        parts.append(
            f"a fixed cost of {seconds * 1000:.3g} ms per {per} ({share:.0%} of the step at "
            f"{small.micro}{' tokens' if small.by_tokens else ''}) spread over more samples"
        )
    fell = sorted(_phase_deltas(step).items(), key=lambda kv: kv[1][1] - kv[1][0])[:2]
    named = [f"{p} {_ms(a)} -> {_ms(b)}" for p, (a, b) in fell if b < a]
    if named:
        parts.append("per sample, " + ", ".join(named) + " ms")
    if small.mfu and large.mfu:
        parts.append(f"MFU {small.mfu:.0%} -> {large.mfu:.0%}")
    if not parts:
        return "per-step costs amortised (no phase split recorded to say which)"
    return "amortised per-step cost: " + "; ".join(parts)


def _fixed_cost(step: GridStep) -> tuple[str, float, float] | None:
    """(what it is per, seconds, its share of the small cell's step) from two step times: a step of
    b samples in g micro-steps takes T = fixed + b x per-sample (doubling, g fixed: fixed per step),
    or T = g x fixed + effective x per-sample (split: fixed per micro-step)."""
    s, c = step.small, step.large
    ts, tc = _step_seconds(s), _step_seconds(c)
    if ts is None or tc is None:
        return None
    if step.kind == "doubling":
        bs, bc = s.samples_per_step, c.samples_per_step  # a token budget's: the measured means
        if not bs or not bc or bs == bc:
            return None
        fixed = (bc * ts - bs * tc) / (bc - bs)
        per = "step"
    else:
        fixed = (ts - tc) / (s.gradient_accumulation_steps - c.gradient_accumulation_steps)
        per = "micro-step"
    if fixed <= 0:
        return None
    share = fixed * (s.gradient_accumulation_steps if per == "micro-step" else 1) / ts
    return per, fixed, share


def _step_seconds(c: Cell) -> float | None:
    """The cell's mean step time: its samples per step at its measured rate."""
    return c.samples_per_step / c.samples_per_s if c.samples_per_step and c.samples_per_s else None


def _flat_cause(step: GridStep) -> str:
    small, large = step.small, step.large
    flat = f"MFU {small.mfu:.0%} -> {large.mfu:.0%}" if small.mfu and large.mfu else "samples/s"
    return f"compute saturated: {flat} flat while the micro-batch grew: bigger batches stop paying"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3g}"
