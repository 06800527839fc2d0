"""SUMM_FAILPOINTS: faults injected by name (summ/failpoints.py)."""

from __future__ import annotations

import json

import pytest
import torch

from summ import failpoints
from summ.errors import ConfigError
from summ.failpoints import Failpoint, Where

from .conftest import assert_one_error_line, cli


def test_a_list_of_failpoints_parses_by_point_with_its_filters():
    armed = failpoints.parse("oom@backward:micro_batch=64:step=2, error@save ,oom@probe:rank=1:accumulation=2")
    assert armed == {
        "backward": (Failpoint("oom", "backward", micro_batch=64, step=2),),
        "save": (Failpoint("error", "save"),),
        "probe": (Failpoint("oom", "probe", rank=1, accumulation=2),),
    }
    assert failpoints.parse("") == {} and failpoints.parse(" , ") == {}


@pytest.mark.parametrize(
    "spec",
    [
        "oom",
        "oom@",
        "boom@forward",
        "oom@sideways",
        "oom@forward:step",
        "oom@forward:step=two",
        "oom@forward:epoch=1",
        "oom@forward:step=1=2",
    ],
)
def test_a_failpoint_that_is_not_one_is_a_config_error_naming_it(spec):
    with pytest.raises(ConfigError) as info:
        failpoints.parse(spec)
    assert "SUMM_FAILPOINTS" in str(info.value) and "\n" not in str(info.value)


def test_every_filter_given_must_match_and_a_missing_fact_never_matches(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    failpoints.configure("oom@forward:micro_batch=8:step=3:rank=1,error@forward:micro_step=2")
    try:
        fp = failpoints.armed("forward", Where(micro_batch=8, accumulation=2, step=3, micro_step=1))
        assert fp is not None and fp.kind == "oom"
        assert failpoints.armed("forward", Where(micro_batch=8, step=4, micro_step=1)) is None
        assert failpoints.armed("forward", Where(micro_batch=4, step=3, micro_step=2)).kind == "error"
        assert failpoints.armed("forward", Where(micro_batch=4, step=3)) is None  # no micro-step known
        assert failpoints.armed("backward", Where(micro_batch=8, step=3)) is None
        monkeypatch.setenv("RANK", "0")
        assert failpoints.armed("forward", Where(micro_batch=8, step=3, micro_step=1)) is None
        with pytest.raises(torch.OutOfMemoryError, match="failpoint oom@forward"):
            monkeypatch.setenv("RANK", "1")
            failpoints.hit("forward", Where(micro_batch=8, step=3, micro_step=1))
    finally:
        failpoints.configure(None)


def test_the_forward_failpoint_raises_inside_the_module_with_its_output_alive():
    module = torch.nn.Linear(4, 4)
    seen = []
    module.register_forward_hook(lambda m, a, out: seen.append(out))  # registered first: runs first
    failpoints.configure("oom@forward")
    try:
        with pytest.raises(torch.OutOfMemoryError):
            with failpoints.inside_forward(lambda: module, "forward", Where()):
                module(torch.randn(2, 4))
        assert len(seen) == 1 and len(module._forward_hooks) == 1  # the failpoint's hook is gone again
        module(torch.randn(2, 4))  # and the module works
        logits = torch.randn(2, 4, requires_grad=True)
        failpoints.configure("oom@backward")
        failpoints.inside_backward(logits, Where())
        with pytest.raises(torch.OutOfMemoryError):
            logits.sum().backward()
    finally:
        failpoints.configure(None)


@pytest.mark.slow
def test_the_command_line_reads_them_from_the_environment(tmp_path):
    cli(
        "-m",
        "batch.batch_size=2,16,2",
        f"hydra.sweep.dir={tmp_path}",
        "sweep.trial_samples=32",
        "sweep.trial_warmup_samples=16",
        env={"SUMM_FAILPOINTS": "oom@backward:micro_batch=16:step=2"},
        timeout=600,
        code=0,
    )
    cells = [json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert [c["status"] for c in cells] == ["ok", "oom", "ok"]
    assert "failpoint oom@backward (micro batch 16, accumulation 1, step 2, micro step 1)" in cells[1]["error"]
    bad = cli(env={"SUMM_FAILPOINTS": "oom@nowhere"}, timeout=120)
    assert_one_error_line(bad, "SUMM_FAILPOINTS", 2)
    assert bad.stderr.strip().count("\n") == 0  # and nothing else
