"""Memory by part and time by phase, checked from outside the code that reports them: the static
parts against the bytes of the trained model's and optimizer's own tensors (bitsandbytes' quant
state read through its own as_dict), the logits against micro-batch x positions x vocabulary x
element size at the widths the data set implies, the phases against the measured step time."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from summ.measure import components
from summ.training import probe
from summ.training.probe import probe_samples as all_probe_samples

from .conftest import free_port

MODELS = {
    "tiny_bart": [],
    "tiny_llama": ["model=tiny_llama"],
    "tiny_llama_4bit": ["model=tiny_llama", "model.quantization=4bit"],
}


def _own_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _weights_by_storage(model: torch.nn.Module) -> dict[str, int]:
    """Counted here without summ: a 4-bit weight's packed bytes and its QuantState's tensors as
    bitsandbytes serialises them (the nested offset, which as_dict turns into a number, as the
    tensor it is); every other tensor by its element size."""
    out: dict[str, int] = {}
    for p in list(model.parameters()) + list(model.buffers()):
        state = getattr(p, "quant_state", None)
        if state is not None:
            parts = [p] + [v for v in state.as_dict(packed=False).values() if torch.is_tensor(v)]
            parts += [state.offset] if torch.is_tensor(state.offset) else []  # as_dict gives it as a float
            key = "4bit"
        else:
            parts, key = [p], {2: "16bit", 4: "32bit"}[p.element_size()]
        out[key] = out.get(key, 0) + sum(t.numel() * t.element_size() for t in parts)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [2, 8, 32])
@pytest.mark.parametrize("model", list(MODELS))
def test_parts_are_the_tensors_bytes(run_job, monkeypatch, counted_parts, model, micro_batch):
    widths = []

    def probe_samples(*args):
        chosen = all_probe_samples(*args)
        widths.append(chosen[0][1])  # one probe micro-batch: (its samples, its widths)
        return chosen

    monkeypatch.setattr(probe, "probe_samples", probe_samples)
    m, _ = run_job(
        *MODELS[model], f"batch.batch_size={micro_batch}", "measure.steps=2", "eval.enabled=false", "train.epochs=50"
    )
    assert m["status"] == "ok", m["error"]
    (trained, optimizer), c = counted_parts[0], m["memory"]["components"]

    assert c["weights_bytes_by_storage"] == _weights_by_storage(trained)
    assert c["weights_bytes"] == sum(c["weights_bytes_by_storage"].values())
    trainable = [p for p in trained.parameters() if p.requires_grad]
    assert c["trainable_bytes"] == _own_bytes(trainable) == c["gradients_bytes"]  # a gradient per trainable weight
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert c["optimizer_state_bytes"] == _own_bytes(state)
    assert c["optimizer_state_bytes"] >= 2 * c["trainable_bytes"]  # AdamW: two moments per weight
    assert 0 < c["activations_bytes"] < m["memory"]["peak_bytes"]
    assert (
        c["weights_bytes"] + c["gradients_bytes"] + c["optimizer_state_bytes"] + c["activations_bytes"]
        == (m["memory"]["peak_bytes"])
    )

    # the logits of the worst batch: the probe's micro-batch padded to the widest input (causal) or
    # label (seq2seq) of the training set, at the vocabulary's width
    batch, positions, vocabulary = c["logits_shape"]
    ((input_width, label_width),), causal = widths, model != "tiny_bart"
    assert batch == micro_batch and vocabulary == trained.get_output_embeddings().out_features
    assert positions == (input_width if causal else label_width)  # a decoder's positions are the label's
    element = 4  # float32 on the CPU
    assert c["logits_bytes"] == batch * positions * vocabulary * element
    assert c["logits_bytes"] <= c["activations_bytes"]

    phases, seconds = m["train"]["phase_seconds"], m["train"]["seconds"]
    assert set(phases) == {"data", "copy", "forward", "backward", "optimizer", "collectives", "bookkeeping"}
    assert math.isclose(sum(phases.values()), seconds, rel_tol=0.05)
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0


@pytest.mark.parametrize("seq2seq", [True, False])
def test_kv_cache_bytes_are_generations_own_cache(seq2seq):
    """The cache generate() leaves behind, its tensors' bytes, against the formula from the config:
    beams x batch sequences, grouped key/value heads (Llama), and a decoder with more heads than
    its encoder (BART)."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=96, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if seq2seq:
        shape = dict(encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=4)
        model = BartForConditionalGeneration(
            BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, **shape, **ids)
        )
    else:
        shape = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, **shape, **ids))
    batch, prompt, beams, new = 3, 11, 2, 7
    inputs = torch.randint(3, 96, (batch, prompt))
    config = GenerationConfig(
        num_beams=beams,
        max_new_tokens=new,
        min_new_tokens=new,
        decoder_start_token_id=2,
        return_dict_in_generate=True,
        **ids,
    )
    out = model.eval().generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    cache = out.past_key_values
    layers = [cache.self_attention_cache, cache.cross_attention_cache] if seq2seq else [cache]
    tensors = [t for c in layers for layer in c.layers for t in (layer.keys, layer.values)]
    assert components.kv_cache_bytes(model.config, seq2seq, batch * beams, prompt, new, 4) == _own_bytes(tensors)


def test_the_optimizer_state_on_an_index_less_cuda_device_is_counted():
    """Accelerate gives a one-GPU run torch.device("cuda"); its tensors are on cuda:0. Comparing
    the two with == would count no optimizer state on every single-GPU run."""
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    assert components.on_device(cuda, cuda0) and components.on_device(cuda0, cuda0)
    assert not components.on_device(cuda0, cuda1) and not components.on_device(cuda, torch.device("cpu"))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert components.optimizer_state_bytes(optimizer, torch.device("cpu")) == moments + steps


def test_sharded_parameters_count_the_shard_this_process_holds():
    """FSDP 2 shards parameters as DTensors, whose storage is their local shard (asking a DTensor
    for its own storage raises). In a fresh process: a process group here would leak into the
    tests after it."""
    script = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from summ.measure import components
mesh = init_device_mesh("cpu", (1,))
model = torch.nn.Linear(8, 4)
model.weight = torch.nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
assert components.weights_by_storage(model) == {"32bit": (8 * 4 + 4) * 4}
assert components.trainable_bytes(model) == (8 * 4 + 4) * 4
dist.destroy_process_group()
print("ok")
"""
    port = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PORT": port}
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
