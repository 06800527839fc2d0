"""Where a run's training memory goes, by the parts engineers reason in.

Counted exactly, from the tensors themselves (each storage once):
- weights, by storage: "4bit" and "8bit" (bitsandbytes' packed weights with their quantization
  state: absmax, code, offset, the nested state of double quantization, LLM.int8's scales),
  "16bit", "32bit" (parameters and buffers in that element size);
- trainable parameters (a part of the weights: what the optimizer updates);
- gradients and optimizer state, counted once, after the optimizer's first real step and before
  its gradients are dropped (an optimizer step post-hook: nothing added to the step's code).
Measured: activations and temporaries, the rest of the training peak above the counted parts. Of
them two are named, because with a 128k vocabulary they are often the largest single piece: the
logits of the largest micro-batch (micro-batch x positions x vocabulary x their element size, read
from the tensor the output layer returned) and the float32 rows the loss takes from them (label
positions x vocabulary x 4, summ/modeling/loss.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from summ.figures import MemoryComponents


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """bitsandbytes' QuantState (4-bit): its tensors (absmax, code, offset) and those of its nested
    state (double quantization quantizes absmax again)."""
    if state is None:
        return []
    found = [v for v in vars(state).values() if torch.is_tensor(v)]
    return found + _quant_state_tensors(getattr(state, "state2", None))


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: a DTensor's (FSDP 2's sharded parameters, their gradients
    and optimizer state) local shard, which has the storage; any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage of its own
        return ("object", id(t))


class _Unique:
    """Bytes of tensors, each storage view once (tied weights, a scale kept on two objects)."""

    def __init__(self):
        self.seen: set = set()

    def bytes(self, tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in map(_local, tensors):
            key = _storage_key(t)
            if t.device.type != "meta" and key not in self.seen:
                self.seen.add(key)
                total += tensor_bytes(t)
        return total


def storage_of(p: torch.Tensor) -> str:
    """The storage class a weight is counted in."""
    if p.__class__.__name__ == "Params4bit":
        return "4bit"
    if p.__class__.__name__ == "Int8Params" or p.dtype == torch.int8:
        return "8bit"
    return {1: "8bit", 2: "16bit", 4: "32bit"}.get(p.element_size(), f"{8 * p.element_size()}bit")


def weights_by_storage(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers by storage class, quantization state included."""
    unique, out = _Unique(), {}
    for p in list(model.parameters()) + list(model.buffers()):
        parts = [p] + _quant_state_tensors(getattr(p, "quant_state", None))
        parts += [s for s in (getattr(p, "SCB", None), getattr(p, "CB", None)) if torch.is_tensor(s)]
        n = unique.bytes(parts)
        if n:
            out[storage_of(p)] = out.get(storage_of(p), 0) + n
    return dict(sorted(out.items()))


def trainable_bytes(model: torch.nn.Module) -> int:
    return _Unique().bytes(p for p in model.parameters() if p.requires_grad)


def gradient_bytes(model: torch.nn.Module) -> int:
    return _Unique().bytes(p.grad for p in model.parameters() if p.grad is not None)


def on_device(run_device: torch.device, tensor_device: torch.device) -> bool:
    """A tensor on the run's device. Accelerate hands a one-process GPU run `torch.device("cuda")`,
    with no index, while its tensors say `cuda:0`: an index-less device matches any of its type."""
    if run_device.type != tensor_device.type:
        return False
    return run_device.index is None or tensor_device.index is None or run_device.index == tensor_device.index


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """The optimizer's state tensors on the training device (torch's AdamW keeps its step counts
    on the host unless fused or capturable: host memory, not the device's)."""
    tensors = (
        v
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and on_device(device, v.device)
    )
    return _Unique().bytes(tensors)


def inner_optimizer(optimizer):
    """The torch optimizer under Accelerate's wrapper (None where it is not one: DeepSpeed's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


class ComponentCount:
    """The counts of one run, taken while it trains: the static parts at the optimizer's first step
    (a post-hook, removed after it), the largest logits the output layer returns (a forward hook),
    and the largest label-row count the loss took (told by the loop's instruments)."""

    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device):
        self.device = device
        self.model = model
        self.weights = weights_by_storage(model)  # they do not change while it trains
        self.trainable = trainable_bytes(model)
        self.gradients: int | None = None
        self.optimizer_state: int | None = None
        self.logits_shape: tuple[int, ...] | None = None
        self.logits_bytes = 0
        self.label_rows = 0
        self.vocabulary: int | None = None
        self._hooks = []
        inner = inner_optimizer(optimizer)
        if inner is not None:
            self._hooks.append(inner.register_step_post_hook(self._after_first_step))
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(out, torch.nn.Module):
            self._hooks.append(out.register_forward_hook(self._saw_logits))

    def _after_first_step(self, optimizer, args, kwargs) -> None:
        if self.gradients is not None:
            return
        self.gradients = gradient_bytes(self.model)
        self.optimizer_state = optimizer_state_bytes(optimizer, self.device)

    def _saw_logits(self, module, args, output) -> None:
        if torch.is_tensor(output) and tensor_bytes(output) > self.logits_bytes:
            self.logits_bytes, self.logits_shape = tensor_bytes(output), tuple(output.shape)
            self.vocabulary = output.shape[-1]

    def saw_label_rows(self, rows: int) -> None:
        """A micro-batch's label positions (its counts, on the host): the loss's float32 rows."""
        self.label_rows = max(self.label_rows, rows)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def figures(self, peak_bytes: int, reserved_peak_bytes: int | None, context_bytes: int | None) -> MemoryComponents:
        """metrics.memory.components: the counts, and the training peak's rest as activations (once
        the optimizer has stepped: before it, gradients and its state are not known)."""
        weights = sum(self.weights.values())
        counted = None
        if self.gradients is not None:
            counted = weights + self.gradients + (self.optimizer_state or 0)
        cuda = self.device.type == "cuda"
        loss_rows = self.label_rows * self.vocabulary * 4 if self.vocabulary else None
        return MemoryComponents(
            weights_bytes=weights,
            weights_bytes_by_storage=self.weights,
            trainable_bytes=self.trainable,
            gradients_bytes=self.gradients,
            optimizer_state_bytes=self.optimizer_state,
            activations_bytes=max(0, peak_bytes - counted) if counted is not None and peak_bytes else None,
            logits_bytes=self.logits_bytes or None,
            logits_shape=list(self.logits_shape) if self.logits_shape else None,
            loss_float32_rows_bytes=loss_rows,
            allocator_reserve_bytes=max(0, reserved_peak_bytes - peak_bytes)
            if cuda and reserved_peak_bytes is not None
            else None,
            context_bytes=context_bytes if cuda else None,
        )


def kv_cache_bytes(
    config, seq2seq: bool, sequences: int, input_positions: int, new_tokens: int, element_size: int
) -> int | None:
    """Generation's key/value cache at its longest: for each decoder layer a key and a value of
    [sequences, key/value heads, positions, head width], `sequences` = batch x beams. A decoder-only
    model caches the prompt and every token but the last generated; an encoder-decoder caches its
    own tokens (self-attention) and the encoded input (cross-attention). None where the config
    does not say its shape."""
    # an encoder-decoder's own config holds its decoder's shape (transformers 5's
    # get_text_config(decoder=True) gives BART a default-sized config instead)
    text = config if seq2seq else config.get_text_config(decoder=True)
    if seq2seq:
        layers, heads = getattr(text, "decoder_layers", None), getattr(text, "decoder_attention_heads", None)
        kv_heads = heads
        positions = new_tokens + input_positions  # its own (start token in, last one out) and the input
    else:
        layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        positions = input_positions + new_tokens - 1
    hidden = getattr(text, "hidden_size", None)
    width = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and width):
        return None
    return 2 * layers * sequences * kv_heads * positions * width * element_size
