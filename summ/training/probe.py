"""The memory probe: one micro-batch at the training set's widest input and label, forward and
backward, between warm-up and the measured steps (the worst batch an epoch can draw, which a few
measured batches rarely meet); and the code paths warmed once per process before any run counts
its memory."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from summ.config import ModelKind
from summ.data.packing import PackingCollator
from summ.data.tokenize import Collator, TokenizedDataset
from summ.measure import flops
from summ.modeling.loss import model_inputs, summed_token_loss
from summ.training.instruments import MemoryStretches
from summ.training.setup import BatchShape


def probe_widths(dataset: TokenizedDataset) -> tuple[int, int]:
    """The widest input and label of the training set: a micro-batch of samples padded to both
    is the heaviest one an epoch can draw (a real batch is padded to its own longest)."""
    return max(dataset.lengths()), max(dataset.label_lengths())


def probe_samples(
    dataset: TokenizedDataset, shape: BatchShape, collator: Collator | PackingCollator
) -> list[tuple[list[int], tuple[int, int]]]:
    """The probe's micro-batches as (samples, the widths they are padded to). With a batch size, one:
    the samples with the most tokens, input and label together, padded to probe_widths (they carry
    as many real label tokens as the worst batch: the loss's label rows grow with them). With a
    token budget, its worst cases (budget_worst_batches) at their own widths."""
    lengths, labels = dataset.lengths(), dataset.label_lengths()
    if shape.max_tokens is None:
        longest = sorted(range(len(lengths)), key=lambda i: lengths[i] + labels[i], reverse=True)
        return [([longest[i % len(longest)] for i in range(shape.micro_batch)], probe_widths(dataset))]
    return [
        (batch, collator.widths([lengths[j] for j in batch], [labels[j] for j in batch]))
        for batch in budget_worst_batches(lengths, labels, collator, shape.max_tokens)
    ]


def probe_batches(dataset: TokenizedDataset, shape: BatchShape, collator: Collator | PackingCollator) -> list[dict]:
    """The probe's micro-batches (probe_samples) collated as the probe and the compile warm-up run them."""
    return [
        collator.probe_batch([dataset[i] for i in indices], widths)
        for indices, widths in probe_samples(dataset, shape, collator)
    ]


def budget_worst_batches(
    lengths: list[int], labels: list[int], collator: Collator | PackingCollator, max_tokens: int
) -> list[list[int]]:
    """The micro-batches within a token budget that no other outweighs, whatever memory costs per
    padded position and per attention score. A padded micro-batch of n samples is n x its width,
    the widest input (and, for an encoder-decoder, the widest label) of its samples: for every width
    the training set can make, the most samples that fit under both the budget and that width. Memory
    grows with the positions P (activations, logits) and with the attention scores, P x the width
    (eager and CPU sdpa), so a wide micro-batch and a full one both compete: those kept maximise
    a x P + b x P x width for some a, b >= 0 (the upper convex hull of the points). Packed rows are
    as wide as their tokens: the fullest micro-batch alone."""
    if isinstance(collator, PackingCollator):
        batch, tokens = [], 0
        for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
            if tokens + lengths[j] <= max_tokens:
                batch, tokens = [*batch, j], tokens + lengths[j]
        return [batch]
    causal = collator.kind == ModelKind.causal
    ins, labs = sorted(set(lengths)), ([0] if causal else sorted(set(labels)))
    row, col = {v: i for i, v in enumerate(ins)}, {v: i for i, v in enumerate(labs)}
    exact = np.zeros((len(ins), len(labs)), dtype=np.int64)  # samples of exactly (input, label)
    for n_in, n_label in zip(lengths, labels):
        exact[row[n_in], col[0 if causal else n_label]] += 1
    under = exact.cumsum(0).cumsum(1)  # samples no wider than (input, label)
    along_in, along_label = exact.cumsum(1), exact.cumsum(0)  # a sample of that input (label) within the other
    points = []
    for i, wide_in in enumerate(ins):
        for k, wide_label in enumerate(labs):
            if not (along_in[i, k] and along_label[i, k]):
                continue  # no sample makes this width
            widths = collator.widths([wide_in], [wide_label])
            width = widths[0] if causal else sum(widths)
            n = min(max_tokens // width, int(under[i, k]))
            if n >= (1 if exact[i, k] else 2):
                points.append((n * width, n * width * width, (wide_in, wide_label, n)))
    return [_fill(lengths, labels, causal, *shape) for _, _, shape in upper_hull(points)]


def _fill(lengths: list[int], labels: list[int], causal: bool, wide_in: int, wide_label: int, n: int) -> list[int]:
    """n samples no wider than (wide_in, wide_label) that make exactly that width, the longest first."""
    fits = [j for j in range(len(lengths)) if lengths[j] <= wide_in and (causal or labels[j] <= wide_label)]
    fits.sort(key=lambda j: -lengths[j] - labels[j])
    both = (j for j in fits if lengths[j] == wide_in and (causal or labels[j] == wide_label))
    makers = [next(both, None) or next(j for j in fits if lengths[j] == wide_in)]
    if not causal and labels[makers[0]] != wide_label:
        makers.append(next(j for j in fits if labels[j] == wide_label))
    return list(dict.fromkeys([*makers, *fits]))[:n]


def upper_hull(points: list[tuple]) -> list[tuple]:
    """The points (x, y, ...) that maximise a x + b y for some a, b >= 0, by x."""
    frontier, top = [], -1
    for p in sorted(points, key=lambda p: (-p[0], -p[1])):  # the widest first at each x
        if p[1] > top:
            frontier.append(p)
            top = p[1]
    hull: list[tuple] = []
    for p in sorted(frontier, key=lambda p: p[0]):
        while len(hull) >= 2 and _turn(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _turn(o: tuple, a: tuple, b: tuple) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


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

    state = torch.get_rng_state()
    small = dict(vocab_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    layers = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2)
    bart = BartForConditionalGeneration(
        BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, **layers, **small)
    )
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    llama = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **layers, **small))
    for model, kind in ((bart, ModelKind.seq2seq), (llama, ModelKind.causal)):
        collate = Collator(0, kind, 2)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        for step in range(2):
            batch = collate(_toy_features(kind))
            counts = batch["counts"]
            positions = counts.tokens + counts.pad_tokens
            with flops.ProfileMicroStep(model, positions=positions) if step == 0 else contextlib.nullcontext():
                logits = model(**model_inputs(batch)).logits
                summed_token_loss(logits, batch["labels"], kind, label_tokens=counts.label_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    _WARMED_PATHS = True


def _toy_features(kind: ModelKind) -> list:
    """Three random samples of 6-19 tokens (a causal one's first three are its prompt)."""
    from summ.data.tokenize import Features

    lengths = torch.randint(6, 20, (3,)).tolist()
    features = [Features(torch.randint(3, 96, (n,)).tolist(), torch.randint(3, 96, (n,)).tolist(), 0) for n in lengths]
    if kind == ModelKind.causal:
        features = [Features(f.input_ids, [-100] * 3 + f.labels[3:], 3) for f in features]
    return features


def probe_memory(accelerator, model, optimizer, batch: dict, kind, memory: MemoryStretches) -> int:
    """One micro-batch at the training set's widest input and label, forward and backward, no
    update and no trace left (gradients dropped, every RNG restored): the memory of the worst
    batch an epoch can draw, which a few measured batches rarely meet. Returns its peak."""
    memory.end_observed_stretch()
    discarded_step(accelerator, model, optimizer, batch, kind)
    return memory.end_probe()


def discarded_step(accelerator, model, optimizer, batch: dict, kind) -> None:
    """Forward and backward on `batch`, leaving nothing: gradients dropped, every RNG restored (the
    memory probe; the compile warm-up)."""
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
