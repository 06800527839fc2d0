"""Every option of every config group composes and validates; bad values fail before compute."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from summ.config import Config
from summ.errors import ConfigError
from summ.validation import validate

from .conftest import CONF, compose_cfg

GROUPS = ["data", "model", "batch", "inference", "augmentation", "tta"]


def _options():
    for group in GROUPS:
        for path in sorted((CONF / group).rglob("*.yaml")):
            yield group, path.relative_to(CONF / group).with_suffix("").as_posix()


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if option == "dialogsum_ko":
        overrides.append("data.dir=/somewhere")
    cfg = compose_cfg(overrides)
    validate(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    assert getattr(obj, group).name == option


def test_each_group_has_options():
    found = {g for g, _ in _options()}
    assert found == set(GROUPS)
    assert {"bs4_ga1", "bs8_ga1", "bs8_ga2", "bs16_ga1", "bs16_ga2", "bs32_ga1"} <= {
        o for g, o in _options() if g == "batch"
    }
    assert {
        "tiny_bart",
        "tiny_llama",
        "kobart",
        "llama",
        "qwen3_4b",
        "solar_10_7b",
        "polyglot_ko_12_8b",
        "kullm_v2",
    } <= {o for g, o in _options() if g == "model"}


def test_real_causal_models_share_qlora_base():
    cfg = compose_cfg(["model=polyglot_ko_12_8b"])
    assert cfg.model.quantization == "4bit" and cfg.model.lora.enabled
    assert list(cfg.model.lora.target_modules) == ["query_key_value"]
    assert compose_cfg(["model=llama"]).model.lora.target_modules[0] == "q_proj"


@pytest.mark.parametrize(
    "override,key",
    [
        ("batch.batch_size=0", "batch.batch_size"),
        ("batch.gradient_accumulation_steps=-1", "batch.gradient_accumulation_steps"),
        ("measure.headroom=1.5", "measure.headroom"),
        ("batch.effective_batch_size=30", "batch.effective_batch_size"),
        ("model=kobart model.quantization=4bit model.lora.enabled=true", "causal"),
    ],
)
def test_bad_values_fail_validation_with_the_key(override, key):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_csv_data_needs_a_folder():
    with pytest.raises(ConfigError, match="data.dir"):
        validate(compose_cfg(["data=dialogsum_ko"]))


@pytest.mark.parametrize(
    "override,exc",
    [
        ("batch.batch_sise=4", (ConfigCompositionException, ConfigKeyError)),
        ("batch.batch_size=four", (ConfigCompositionException, ValidationError)),
        ("train.mixed_precision=fp8", (ConfigCompositionException, ValidationError)),
        ("model=nosuch", (MissingConfigException, ConfigCompositionException)),
    ],
)
def test_typos_and_types_fail_at_composition(override, exc):
    with pytest.raises(exc):
        compose_cfg([override])


def _closed_choices(node=None, prefix=""):
    """Every enum-typed key of the schema (found by walking the composed config, each section typed
    by its schema dataclass: a key whose default is null has its type there, not in its value)."""
    import dataclasses
    import enum
    import types
    import typing

    from omegaconf import DictConfig, OmegaConf

    node = compose_cfg([]) if node is None else node
    schema = OmegaConf.get_type(node)
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        if key == "hydra":
            continue
        if isinstance(None if OmegaConf.is_missing(node, key) else node[key], DictConfig):
            yield from _closed_choices(node[key], f"{prefix}{key}.")
            continue
        kind = hints.get(key, OmegaConf.get_type(node, key))
        kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        if any(isinstance(k, type) and issubclass(k, enum.Enum) for k in kinds):  # Optional[Enum] included
            yield f"{prefix}{key}"


CLOSED = sorted(_closed_choices())


def test_the_closed_choices_are_enums():
    assert {
        "model.quantization",
        "inference.quantization",
        "mode",
        "tracking.name",
        "model.dtype",
        "data.padding",
        "ensemble.strategy",
        "objective",
        "solar.prompt_strategy",
        "generation.kind",
        "predict.split",
        "train.mixed_precision",
        "data.source",
    } <= set(CLOSED)


@pytest.mark.parametrize("key", CLOSED)
def test_a_typo_in_a_closed_choice_fails_at_composition(key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([f"{key}=nosuch_choice"])
    assert "expected one of" in str(info.value.__cause__)  # what Hydra prints under the error


@pytest.mark.parametrize("key", ["augmentation.methods", "tta.methods"])
def test_a_typo_in_a_list_of_methods_fails_at_composition(key):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([f"{key}=[synonym,nosuch]"])


def test_each_default_is_written_once():
    """conf/config.yaml picks groups and Hydra's folders; every value's default is the schema's."""
    import yaml

    top = yaml.safe_load((CONF / "config.yaml").read_text())
    assert set(top) <= {"defaults", "hydra"}


def test_effective_batch_derives_accumulation():
    from summ.config import resolve_batch

    assert resolve_batch(4, 1, 32, num_processes=1) == (4, 8, 32)
    assert resolve_batch(4, 1, 32, num_processes=2) == (4, 4, 32)
    assert resolve_batch(8, 2, None, num_processes=2) == (8, 2, 32)
    with pytest.raises(ConfigError):
        resolve_batch(3, 1, 32, num_processes=1)
