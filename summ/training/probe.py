"""The memory probe: one micro-batch at the training set's widest input and label, forward and
backward, between warm-up and the measured steps (the worst batch an epoch can draw, which a few
measured batches rarely meet); and the code paths warmed once per process before any run counts
its memory."""

from __future__ import annotations

import contextlib

import torch

from summ.config import ModelKind
from summ.data.tokenize import Collator, TokenizedDataset
from summ.measure import flops
from summ.modeling.loss import model_inputs, summed_token_loss
from summ.training.instruments import MemoryStretches


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
    return memory.end_probe()
