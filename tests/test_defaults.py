"""One source for every default: the schemas in summ/config.py. No group option and no preset
restates one, every declared lower bound refuses its values, every key validation.py names is
a setting, and a run's status is written as its plain string."""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import json
import re
import typing
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from summ.config import NOT_COMPUTED, Config
from summ.errors import RUN_STATUSES, ConfigError, Status
from summ.run_folder import RunMetrics, read_metrics, write_metrics
from summ.validation import bounds, validate

from .conftest import CONF, ROOT, compose_cfg

PRESETS = ROOT / "multirun_presets"  # conf/preset links here
# Group folders that are not mounted at their own name: model_base's files are included by the
# real causal models with `@_here_`, so they land on `model`.
MOUNTED = {"model_base": "model"}
NOT_SUMM = {"hydra", "preset"}  # Hydra's own settings; presets are walked from PRESETS
NO_DEFAULT = object()


def _field(schema: type, name: str) -> tuple[dataclasses.Field, type | None]:
    """The field `name` of `schema`, and the schema of its value where that is a dataclass."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if name not in fields:
        raise KeyError(name)
    hint = typing.get_type_hints(schema)[name]
    inner = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
    return fields[name], inner[0] if inner else None


def schema_default(key: str) -> object:
    """The structured-config default at dotted `key` (NO_DEFAULT where the schema has none);
    KeyError where the schema has no such key."""
    schema: type | None = Config
    *parents, leaf = key.split(".")
    for part in parents:
        _, schema = _field(schema, part) if schema else (None, None)
        if schema is None:
            raise KeyError(key)
    f, _ = _field(schema, leaf)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return NO_DEFAULT if default is dataclasses.MISSING or default == MISSING else default


def _same(value: object, default: object) -> bool:
    if default is NO_DEFAULT or isinstance(value, bool) != isinstance(default, bool):
        return False
    if isinstance(default, enum.Enum):
        return value == default.value
    return value == default


def _leaves(node: dict, prefix: str):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted, value


def restated(path: Path, mounted_at: str) -> list[str]:
    """`key=value` for every setting of the YAML file at `path` equal to its schema default.
    `mounted_at`: the config node the file merges onto ("" for the root: presets, config.yaml).
    The defaults list and Hydra's own settings (a preset's sweep parameters) are not settings."""
    text = path.read_text(encoding="utf-8")
    package = re.search(r"^# @package (\S+)", text, re.MULTILINE)
    if package and package.group(1) == "_global_":
        mounted_at = ""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    prefix = f"{mounted_at}." if mounted_at else ""
    found = []
    for key, value in _leaves({k: v for k, v in node.items() if k not in ("defaults", "hydra")}, prefix):
        try:
            default = schema_default(key)
        except KeyError:
            found.append(f"{key} is not a setting of the schema")
            continue
        if _same(value, default):
            found.append(f"{key}={value}")
    return found


def _yaml_files() -> list[tuple[Path, str]]:
    files = [(CONF / "config.yaml", "")]
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_SUMM):
        files += [(path, MOUNTED.get(folder.name, folder.name)) for path in sorted(folder.rglob("*.yaml"))]
    return files + [(path, "") for path in sorted(PRESETS.glob("*.yaml"))]


def test_every_group_folder_is_walked():
    """A new group folder is checked too: it mounts at a schema key, or MOUNTED says where."""
    for folder in (p for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_SUMM):
        assert MOUNTED.get(folder.name, folder.name) in {f.name for f in dataclasses.fields(Config)}, folder
    assert len(_yaml_files()) > 40 and all(path.is_file() for path, _ in _yaml_files())


@pytest.mark.parametrize(
    "path,mounted_at", _yaml_files(), ids=lambda v: v.relative_to(ROOT).as_posix() if isinstance(v, Path) else None
)
def test_no_yaml_restates_a_schema_default(path, mounted_at):
    found = restated(path, mounted_at)
    assert not found, (
        f"{path.relative_to(ROOT)} restates the schema's default (summ/config.py): remove {', '.join(found)}"
    )


def test_a_restated_default_is_caught(tmp_path):
    """The check above can fail: a group option and a preset that each restate defaults."""
    option = tmp_path / "batch.yaml"
    option.write_text("# micro-batch 8\nname: bs8\nbatch_size: 8\ngradient_accumulation_steps: 2\n")
    assert restated(option, "batch") == ["batch.batch_size=8"]
    model = tmp_path / "model.yaml"
    model.write_text("name: m\nkind: causal\ntiny: {arch: bart, d_model: 32}\nlora: {target_modules: []}\n")
    assert restated(model, "model") == ["model.tiny.arch=bart", "model.lora.target_modules=[]"]
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "# @package _global_\ndefaults:\n  - override /data: synthetic\nhydra:\n  sweeper:\n"
        "    params:\n      batch.batch_size: 8\nsweep:\n  trial_samples: 192\n  evaluate: true\n"
        "objective: train_seconds_per_sample\ntrain: {cpu: 0}\n"
    )
    assert restated(preset, "preset") == ["sweep.trial_samples=192", "objective=train_seconds_per_sample"]
    preset.write_text("# @package _global_\nsweep:\n  trial_sample: 100\n")
    assert restated(preset, "") == ["sweep.trial_sample is not a setting of the schema"]


def test_bounds_are_declared_beside_their_fields():
    declared = bounds()
    assert ("batch.batch_size", 0, True) in declared and ("model.lora.r", 0, True) in declared
    assert ("train.weight_decay", 0, False) in declared and ("knee.tolerance", 0, False) in declared
    for key, _, _ in declared:
        schema_default(key)  # a key the schema has


def test_every_bound_refuses_its_values():
    """Each declared bound refuses what it says, in the one line users see, and takes the bound
    itself where it is not strict (another rule may refuse that value for its own reason)."""
    base = compose_cfg()
    for key, low, strict in bounds():
        for value in [low, low - 1] if strict else [low - 1, low]:
            cfg = copy.deepcopy(base)
            OmegaConf.update(cfg, key, value)
            said = f"{key}={OmegaConf.select(cfg, key)} is invalid: it must be {'>' if strict else '>='} {low:g}"
            if strict or value < low:
                with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
                    validate(cfg)
                continue
            try:
                validate(cfg)
            except ConfigError as exc:
                assert str(exc) != said


def _dotted_keys_in(source: Path) -> set[str]:
    """String constants shaped like a dotted setting (`measure.headroom`) whose first part is a
    section of the schema."""
    sections = {f.name for f in dataclasses.fields(Config)}
    return {
        node.value
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", node.value)
        and node.value.split(".")[0] in sections
    }


def test_every_key_validation_names_is_a_setting():
    """validation.py reads settings by dotted name (OmegaConf.select): a renamed key would read
    None and its rule would pass silently; so would a renamed key in NOT_COMPUTED."""
    keys = _dotted_keys_in(ROOT / "summ" / "validation.py") | set(NOT_COMPUTED)
    assert "measure.headroom" in keys and "model.tiny.max_positions" in keys
    for key in sorted(keys):
        try:
            schema_default(key)
        except KeyError:
            pytest.fail(f"{key} (summ/validation.py or config.NOT_COMPUTED) is not a setting of the schema")


def test_a_status_is_written_and_read_as_its_plain_string(tmp_path):
    for status in RUN_STATUSES:
        write_metrics(tmp_path, RunMetrics(status=status))
        raw = json.loads((tmp_path / "metrics.json").read_text())
        assert type(raw["status"]) is str and raw["status"] == status.value
        record = read_metrics(tmp_path).record
        assert record.status is status and record.status == status.value
    assert [s.value for s in RUN_STATUSES] == ["ok", "oom", "over_budget", "diverged", "failed", "interrupted"]
    assert f"{Status.over_budget}|{Status.ok!s}" == "over_budget|ok"
