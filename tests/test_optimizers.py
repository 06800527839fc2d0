"""train.optimizer: each one builds what it says, holds the state its algorithm needs (counted in
the memory components), and is refused with one line where it cannot run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from summ.errors import ConfigError
from summ.training import optimizers

from .conftest import assert_one_error_line, cli, compose_cfg

QUANTIZED_FROM = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit moments
QMAP = 256 * 4  # a float32 quantization map of 256 levels per moment, shared by every tensor


def _state_bytes_by_algorithm(name: str, params: list[torch.Tensor], blocksize: int) -> int:
    """What each algorithm keeps per trainable tensor, from its definition (not from the optimizer)."""
    total = 2 * QMAP if name == "adamw_8bit" and any(p.numel() >= QUANTIZED_FROM for p in params) else 0
    for p in params:
        n = p.numel()
        if name in ("adamw_fused", "adamw_foreach"):
            total += 2 * 4 * n + 4  # two float32 moments, a float32 step count per tensor
        elif name == "adafactor":  # a row and a column of the second moment per matrix, no first moment
            total += 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else n) + 4
        elif name == "adamw_8bit":
            if n >= QUANTIZED_FROM:  # two uint8 moments and a float32 absmax per block of each
                total += 2 * n + 2 * 4 * math.ceil(n / blocksize)
            else:
                total += 2 * 4 * n
    return total


@pytest.mark.parametrize(
    "name,built",
    [
        ("adamw", "adamw_fused"),
        ("adamw_foreach", "adamw_foreach"),
        ("adamw_8bit", "adamw_8bit"),
        ("adafactor", "adafactor"),
    ],
)
def test_each_optimizer_holds_the_state_its_algorithm_needs(run_job, counted_parts, name, built):
    m, _ = run_job(f"train.optimizer={name}", "measure.steps=2", "eval.enabled=false")
    assert m["status"] == "ok", m["error"]
    assert m["optimizer"] == built  # said from the object: on the CPU, adamw is the fused kernel
    (model, optimizer), c = counted_parts[0], m["memory"]["components"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocksize = 256  # bitsandbytes' block on the CPU, read back from the largest tensor's absmax below
    if name == "adamw_8bit":
        big = max(trainable, key=lambda p: p.numel())
        blocksize = math.ceil(big.numel() / optimizer.state[big]["absmax1"].numel())
        assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert c["optimizer_state_bytes"] == _state_bytes_by_algorithm(built, trainable, blocksize)


def _params(device="cpu", dtype=torch.float32):
    return [torch.nn.Parameter(torch.zeros(8, 8, device=device, dtype=dtype))], [
        torch.nn.Parameter(torch.zeros(8, device=device, dtype=dtype))
    ]


@pytest.mark.parametrize("device,built", [("cpu", "adamw_fused"), ("cuda", "adamw_fused"), ("meta", "adamw_for_loop")])
def test_adamw_takes_the_fastest_implementation_the_training_device_has(device, built):
    """The device the run steps on decides (the parameters may still be on the host when it is built)."""
    cfg = compose_cfg(["train.optimizer=adamw"])
    assert optimizers.said(optimizers.build_optimizer(*_params(), cfg.train, torch.device(device))) == built


def test_fused_adamw_is_refused_where_torch_has_none_or_for_parameters_it_cannot_step():
    cfg = compose_cfg(["train.optimizer=adamw_fused"])
    with pytest.raises(ConfigError, match="no fused AdamW on meta: use train.optimizer=adamw"):
        optimizers.build_optimizer(*_params(), cfg.train, torch.device("meta"))
    with pytest.raises(ConfigError, match="floating-point parameters only.*complex64"):
        optimizers.build_optimizer(*_params(dtype=torch.complex64), cfg.train, torch.device("cpu"))


def test_8bit_optimizers_without_bitsandbytes_are_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    cfg = compose_cfg(["train.optimizer=adamw_8bit"])
    with pytest.raises(ConfigError, match=r"needs bitsandbytes \(pip install bitsandbytes\)"):
        optimizers.build_optimizer(*_params(), cfg.train, torch.device("cpu"))


def test_the_paged_optimizer_is_refused_off_cuda_with_one_line(tmp_path):
    """bitsandbytes would fall back to the unpaged one with a warning: a run that says paged would not be."""
    proc = cli("train.optimizer=paged_adamw_8bit", "measure.steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_error_line(proc, "use train.optimizer=adamw_8bit", 2)


def test_an_unknown_optimizer_fails_at_composition():
    with pytest.raises(Exception) as failed:
        compose_cfg(["train.optimizer=sgd"])
    assert "expected one of [adamw, adamw_fused" in str(failed.value.__cause__ or failed.value)


@pytest.mark.parametrize("name", ["adamw_8bit", "adafactor"])
def test_a_run_resumed_from_a_checkpoint_continues_each_optimizers_state(run_job, name):
    """The optimizer's state goes into the checkpoint and back: the resumed steps lose as the straight ones."""
    common = (f"train.optimizer={name}", "train.max_steps=6", "eval.enabled=false", "model.tiny.dropout=0")
    straight, folder = run_job(*common, "train.save_every_steps=3")
    assert straight["status"] == "ok", straight["error"]
    resumed, again = run_job(*common, f"train.resume_from={folder / 'checkpoints' / 'step_3'}")
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 3, resumed["error"]
    assert resumed["optimizer"] == straight["optimizer"] == name
    losses = [
        [json.loads(line)["loss"] for line in (f / "train_history.jsonl").read_text().splitlines()]
        for f in (folder, again)
    ]
    assert len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)  # steps 1-3 carried over
