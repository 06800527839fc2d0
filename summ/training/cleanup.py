"""What a run must not leave behind for the next cell of a sweep in the same process: Accelerate's
process-wide state, and the frames of the error that ended it."""

from __future__ import annotations

import traceback


def reset_accelerate() -> None:
    """Accelerate keeps process-wide state; a sweep's next job may use another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def clear_frames(exc: BaseException | None) -> None:
    """The locals of the finished frames in `exc`'s traceback, and in those of the errors it was
    raised from, released (frames still running are skipped). While an error is on its way out,
    its traceback holds every frame it left: the failed step's batch, logits and graph, and through
    them the optimizer, the loader and the Accelerator; nothing can free them until it is handled,
    and for good where a frame holds the error itself (a cycle) and a sweep then freezes what
    survived the cell (gc.freeze). The traceback keeps its lines: error.log is written from it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
