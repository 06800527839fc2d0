"""`model.attn_implementation=sdpa_varlen`: torch's scaled_dot_product_attention run once per
sample of a packed row, the varlen path that flash_attention_2 takes on a GPU, for devices and
installs without flash-attn (the CPU, sdpa-only GPUs).

transformers 5 keeps packed samples apart on `sdpa` with a block-diagonal mask over the whole row
(masking_utils.find_packed_sequence_indices): correct, but the attention scores are computed for
every pair in the row, row_len^2 per row instead of the sum of each sample's len^2, so packing pays
for its saved padding in attention work (BENCHMARKS.md §11). Here each sample's slice of the row is
attended alone, causal, with no mask: the work of length grouping without its padding.

Anything that is not a packed causal row (a padding mask, a KV cache, an encoder, one sample per
row, a sample longer than a sliding-window layer's window) runs transformers' own sdpa with the mask
it built, so the name means sdpa everywhere else: evaluation and generation are unchanged. A packed
row's own block-diagonal mask is never built (sdpa_varlen_mask). The
samples of a row are found as transformers finds them (a position that does not follow the one
before starts a sample), once per forward: the layers share the forward's position_ids tensor, and
its segment bounds are kept for it.
"""

from __future__ import annotations

import weakref

import torch

NAME = "sdpa_varlen"

_bounds_for: tuple[weakref.ref | None, list[list[tuple[int, int]]]] = (None, [])


def segment_bounds(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """Each of `rows` rows' samples as (start, end) column ranges: a sample starts where a position
    is not the one before it plus one (transformers' rule for packed rows), so pad positions that
    restart at 0 are a segment of their own. position_ids of one row are every row's."""
    global _bounds_for
    ref, bounds = _bounds_for
    if ref is not None and ref() is position_ids and len(bounds) == rows:
        return bounds
    starts = torch.diff(position_ids.expand(rows, -1), dim=-1) != 1
    width = position_ids.shape[-1]
    bounds = []
    for row in starts.cpu().tolist():
        cuts = [0, *(i + 1 for i, cut in enumerate(row) if cut), width]
        bounds.append(list(zip(cuts[:-1], cuts[1:])))
    _bounds_for = (weakref.ref(position_ids), bounds)
    return bounds


def sdpa_varlen_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """An attention function (transformers' AttentionInterface): query, key, value are
    (batch, heads, positions, head_dim); returns (batch, positions, heads, head_dim), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (
        position_ids is not None
        and getattr(module, "is_causal", False)
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    bounds = segment_bounds(position_ids, query.shape[0]) if packed else []
    window = getattr(module, "sliding_window", None)  # a sliding-window layer: its mask bounds what a token sees
    if window and any(e - s > window for row in bounds for s, e in row):
        bounds = []
    if not bounds or all(len(row) == 1 for row in bounds):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    # split, not sliced: a split's backward concatenates the pieces' gradients once, where each slice's
    # would allocate a zero gradient of the whole tensor and add its own into it
    for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), bounds, strict=True):
        lengths = [e - s for s, e in row]
        pieces = [
            sdpa_attention_forward(module, *parts, None, **kwargs)[0]
            for parts in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2), strict=True)
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def sdpa_varlen_mask(**kwargs):
    """sdpa's mask (transformers' mask interface), except where it would only be read as causal or
    as a packed row's block diagonal: no padding mask, no cache offset, no local window, no mask
    overlay (a model's or/and mask functions). There it is None: a plain row is attended causal
    as sdpa would, and a packed row's mask is never read, so building it (row_len^2 booleans, a few
    % of a tiny model's step, BENCHMARKS.md §11) is skipped."""
    from transformers.masking_utils import sdpa_mask

    if (
        kwargs.get("attention_mask") is None
        and kwargs.get("local_size") is None
        and not kwargs.get("use_vmap")
        and all(isinstance(kwargs.get(k, 0), int) and kwargs.get(k, 0) == 0 for k in ("q_offset", "kv_offset"))
        and kwargs["q_length"] == kwargs["kv_length"]
    ):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Make `sdpa_varlen` a name transformers takes for attn_implementation, with sdpa's mask where
    a fallback above reads it (sdpa_varlen_mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
