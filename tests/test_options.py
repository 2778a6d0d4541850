"""Declared option validation, the errors that name options, and how the CLI and recipes word them."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest

from mimc.compression.blocks import BlockPruningConfig
from mimc.compression.registry import config_types
from mimc.compression.tokens import TokenReductionConfig
from mimc.errors import ConfigError, DataError
from mimc.options import Options, StageConfig, option
from mimc.pipeline.recipe import ProfileConfig, parse_recipe
from mimc.pipeline.stages import GRAPH_CONFIGS


@dataclasses.dataclass(frozen=True)
class _Toy(StageConfig):
    name: ClassVar[str] = "toy"
    ratio: float | None = option(None, gt=0, lt=1, doc="fraction removed")
    steps: int = option(10, ge=1)
    mode: str = option("a", choices=("a", "b"))
    flag: bool = False
    sizes: tuple[int, ...] = option((), ge=1)

    def check(self) -> None:
        if self.mode == "b" and self.ratio is None:
            raise ConfigError("mode b needs ratio", option=("mode", "ratio"))


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, "ratio must be in (0, 1), got 1.5"),
    ({"ratio": "0.5"}, "ratio must be a number, got '0.5'"),  # strings are not numbers
    ({"ratio": True}, "ratio must be a number, got True"),  # nor are bools
    ({"steps": True}, "steps must be an integer, got True"),
    ({"steps": 2.0}, "steps must be an integer, got 2.0"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"mode": "c"}, "unknown mode 'c': choose one of a, b"),
    ({"flag": 1}, "flag must be true or false, got 1"),
    ({"sizes": 4}, "sizes must be a list, got 4: write [4]"),
    ({"sizes": [4, 0]}, "sizes must hold values >= 1, got [4, 0]"),
    ({"mode": "b"}, "mode b needs ratio"),  # check(): a rule across fields
])
def test_declared_checks_refuse_with_the_option_named(kwargs, message):
    with pytest.raises(ConfigError) as info:
        _Toy(**kwargs)
    assert str(info.value) == message
    assert set(info.value.options) == set(kwargs) | ({"ratio"} if kwargs == {"mode": "b"} else set())


def test_lists_become_tuples_and_round_trip_through_dicts():
    toy = _Toy(ratio=0.5, sizes=[1, 8])
    assert toy.sizes == (1, 8) and hash(toy)
    assert toy.to_dict() == {"ratio": 0.5, "steps": 10, "mode": "a", "flag": False, "sizes": [1, 8]}
    assert _Toy.from_dict(toy.to_dict()) == toy
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['step'\] for stage 'toy'"):
        _Toy.from_dict({"step": 3})


@dataclasses.dataclass(frozen=True)
class _Record(Options):
    weights: list[float] = option((1.0,), gt=0)  # a list[...] field (the encoder record's image_std)


def test_list_fields_stay_lists_and_refuse_what_a_value_refuses():
    assert _Record(weights=(2, 3)).weights == [2, 3] and _Record().to_dict() == {"weights": [1.0]}
    for weights, message in (([1.0, float("inf")], "weights must hold finite numbers, got [1.0, inf]"),  # as one value
                             ([True], "weights must be a list of numbers, got [True]"),
                             ([0.5, 0], "weights must hold values > 0, got [0.5, 0]")):
        with pytest.raises(ConfigError) as info:
            _Record(weights=weights)
        assert str(info.value) == message and info.value.options == ("weights",)


def test_numpy_numbers_are_kept_as_python_numbers():
    # before: a float32 ratio was accepted, then writing mimc.json / recipe.yaml failed after the work
    import numpy as np

    toy = _Toy(ratio=np.float32(0.5), steps=np.int64(3), sizes=[np.int32(2)])
    assert [type(v) for v in (toy.ratio, toy.steps, toy.sizes[0])] == [float, int, int]
    assert json.loads(json.dumps(toy.to_dict())) == {"ratio": 0.5, "steps": 3, "mode": "a", "flag": False, "sizes": [2]}
    recipe = parse_recipe({"model": "ref", "n": np.int64(8), "seed": np.uint8(1), "stages": [{"prune": {"ratio": np.float32(0.5)}}]})
    assert (recipe.n, recipe.seed) == (8, 1) and "0.5" in recipe.to_yaml()


def test_phrased_replaces_whole_words_only():
    exc = ConfigError("ratio 0.1 of 4 blocks rounds to 0 removed: give ratio >= 0.125 (see ratio_table, x.ratio)", option="ratio")
    assert exc.phrased({"ratio": "--ratio"}) == "--ratio 0.1 of 4 blocks rounds to 0 removed: give --ratio >= 0.125 (see ratio_table, x.ratio)"
    assert exc.phrased({}) == str(exc)  # an option the caller has no word for stays as it is
    assert DataError("no images", option="data").phrased({"data": "--calib"}) == "--calib: no images"
    exc = DataError("cannot read image val/c0/x.png ('./val'): pass val again", option="val")
    assert exc.phrased({"val": "--val"}) == "cannot read image val/c0/x.png ('./val'): pass --val again"  # paths stay


def test_recorded_dicts_are_unchanged():
    # manifests and recipe.yaml files replay these: same keys, same values, same order
    assert BlockPruningConfig(blocks=[5, 3]).to_dict() == {"ratio": None, "keep": None, "blocks": [3, 5], "criterion": "entropy",
                                                          "seed": 0, "hist_bins": 65536, "dtype": "fp16"}
    assert TokenReductionConfig(r=[8, 8, 4]).to_dict() == {"method": "tome", "r": 0, "r_list": [8, 8, 4], "inflection": 0.0, "keep": None,
                                                          "at": [], "fuse": True, "pattern": "grid", "prop_attn": False}


def _all_configs():
    return {**config_types(), **GRAPH_CONFIGS}


def _check_against_schema(schema: dict, value) -> None:
    """The few keywords json_schema() writes, checked without a dependency."""
    kinds = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool), "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
             "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(kinds[t](value) for t in types), (schema, value)
    if "enum" in schema:
        assert value in schema["enum"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert value > schema.get("exclusiveMinimum", float("-inf")) and value >= schema.get("minimum", float("-inf"))
        assert value < schema.get("exclusiveMaximum", float("inf")) and value <= schema.get("maximum", float("inf"))
    if isinstance(value, list):
        for item in value:
            _check_against_schema(schema.get("items", {}), item)
    if isinstance(value, dict) and "properties" in schema:
        assert not set(value) - set(schema["properties"]) or schema.get("additionalProperties", True)
        for key, item in value.items():
            _check_against_schema(schema["properties"].get(key, {}), item)


KEYWORDS = {"$schema", "title", "description", "type", "properties", "additionalProperties", "items", "minItems", "enum",
            "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def _keywords(schema: dict) -> set[str]:
    found = set(schema)
    for sub in schema.get("properties", {}).values():
        found |= _keywords(sub)
    if isinstance(schema.get("items"), dict):
        found |= _keywords(schema["items"])
    return found


def _smallest(cls):
    """The config with only the options it cannot do without (prune needs an amount, ToMe its r)."""
    return {BlockPruningConfig: lambda: cls(ratio=0.5), TokenReductionConfig: lambda: cls(r=8)}.get(cls, cls)()


@pytest.mark.parametrize("cls, example", [
    (BlockPruningConfig, BlockPruningConfig(blocks=(1, 3))),
    (TokenReductionConfig, TokenReductionConfig(method="topk", keep=0.5, at=(2, 4))),
    (ProfileConfig, ProfileConfig(batch_sizes=(1, 8), threads=2)),
])
def test_json_schema_of_a_stage_describes_its_options(cls, example):
    schema = json.loads(json.dumps(cls.json_schema()))  # plain JSON
    assert schema["title"] == cls.name and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(cls)}
    assert _keywords(schema) <= KEYWORDS
    _check_against_schema(schema, example.to_dict())
    _check_against_schema(schema, _smallest(cls).to_dict())
    typed = next(k for k, v in schema["properties"].items() if v.get("type") and "string" not in str(v["type"]))
    with pytest.raises(AssertionError):
        _check_against_schema(schema, {**example.to_dict(), typed: "not-valid-here"})


@pytest.mark.parametrize("cls", [BlockPruningConfig, TokenReductionConfig, ProfileConfig])
def test_json_schema_is_valid_json_schema(cls):
    jsonschema = pytest.importorskip("jsonschema")
    schema = cls.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    example = _smallest(cls)
    jsonschema.validate(example.to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example.to_dict(), "nonsense": 1}, schema)


def test_recipe_words_an_option_error_as_its_key():
    with pytest.raises(ConfigError) as info:
        parse_recipe({"model": "ref", "stages": ["export", {"tokens": {"method": "drop", "keep": 0.5}}, {"prune": {"ratio": 0.5, "keep": 3}}]},
                     where="r.yaml")
    assert str(info.value).startswith("r.yaml: block pruning takes exactly one of stages[2].prune.ratio, stages[2].prune.keep or "
                                      "stages[2].prune.blocks")
    assert info.value.options == ()  # already worded: the CLI leaves it alone


def test_cli_words_an_option_error_as_its_flag(tmp_path):
    from typer.testing import CliRunner

    from mimc.cli.app import app

    result = CliRunner().invoke(app, ["prune", "ref", "--ratio", "0.5", "--hist-bins", "1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error: --hist-bins must be in [2, 16777216], got 1" in result.output
    result = CliRunner().invoke(app, ["quantize", "ref", "-o", str(tmp_path / "q.onnx")])  # no images: `data` is --calib here
    assert result.exit_code == 2 and "give --calib (a folder" in result.output, result.output


@pytest.mark.parametrize("stage, options", [
    ("prune", {"ratio": 0.5, "criterion": "random"}), ("sparsify", {}), ("distill", {}),
])
@pytest.mark.parametrize("seed", [-1, 1 << 70])
def test_a_seed_out_of_range_is_refused_naming_it(stage, options, seed):
    # before: 1 << 70 was a ValueError traceback ('Overflow when unpacking long long') from torch's
    # generator once the stage ran (prune --criterion random, a learning run's per-step generator)
    with pytest.raises(ConfigError) as info:
        config_types()[stage].from_dict({**options, "seed": seed})
    assert info.value.options == ("seed",) and "seed must be in [0, 4294967295]" in str(info.value)


@pytest.mark.parametrize("stage, option, value", [
    ("sparsify.learned", "reg_lambda", float("nan")), ("sparsify.learned", "prior_strength", float("-inf")),
    ("distill", "lr", float("inf")), ("distill", "token_weight", float("inf")), ("distill", "epochs", float("inf")),
])
def test_a_number_that_is_not_finite_is_refused_naming_it(stage, option, value):
    # before: accepted (unbounded, or inf within a lower bound), and distill with lr / token_weight inf or
    # weight_decay nan wrote a model of NaN weights (pooled cosine 0.0000) with exit 0
    from mimc.compression.nm_learned import NMLearnedConfig

    cls = NMLearnedConfig if stage == "sparsify.learned" else config_types()[stage]
    with pytest.raises(ConfigError) as info:
        cls.from_dict({option: value})
    assert info.value.options == (option,) and str(info.value) == f"{option} must be a finite number, got {value}"


@pytest.mark.parametrize("stage, option", [("distill", "min_lr"), ("distill", "weight_decay"), ("distill", "clip_grad"),
                                           ("sparsify.learned", "min_lr"), ("sparsify.learned", "weight_decay")])
def test_a_negative_learning_rate_floor_decay_or_clip_is_refused(stage, option):
    # before: accepted; min_lr < 0 ended the schedule on a negative learning rate (gradient ascent), a negative
    # weight decay grew the weights (AdamW checks only its default, not a parameter group's) and a negative
    # clip_grad was silently no clipping
    from mimc.compression.nm_learned import NMLearnedConfig

    cls = NMLearnedConfig if stage == "sparsify.learned" else config_types()[stage]
    with pytest.raises(ConfigError) as info:
        cls.from_dict({option: -0.1})
    assert info.value.options == (option,) and str(info.value) == f"{option} must be >= 0, got -0.1"
