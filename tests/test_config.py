"""The option dataclasses: parsers built from their fields, help text, config files under flags,
validation that names the option, and the to_dict/from_dict round trip."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random

import pytest

from fastmgrpo import eval as eval_cli
from fastmgrpo.config import ConfigError, EvalConfig, MGRPOConfig, _field_type, build_parser, parse_config

PARSERS = [(MGRPOConfig, build_parser), (EvalConfig, eval_cli.build_parser)]
# EvalConfig fields declared with same_as(...): the training option each one shares
SHARED = {"model": "model", "limit": "eval_limit", "batch_size": "rollout_batch_size", "top_p": "top_p",
          "top_k": "top_k", "l2_format": "l2_format", "stop": "stop", "prompt_shots": "prompt_shots",
          "seed": "seed", "device": "device", "precision": "precision"}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


@pytest.mark.parametrize("cls, make_parser", PARSERS, ids=["train", "eval"])
def test_parser_has_one_documented_flag_per_field(cls, make_parser):
    parser = make_parser()
    options = _options(parser)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(options) == set(fields)
    help_text = parser.format_help()
    for name, f in fields.items():
        action = options[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        assert len(f.metadata["help"].strip()) > 10, name
        assert action.help.startswith(f.metadata["help"].replace("%", "%%")), name
        assert f"(default: {_default(f)!r})".replace("%", "%%") in action.help, name
        assert action.default is argparse.SUPPRESS  # the dataclass (or a config file) supplies it
        assert action.choices == f.metadata["choices"]
        assert "--" + name.replace("_", "-") in help_text
    for name in ("progress",) if cls is EvalConfig else ("resume", "overwrite"):
        assert isinstance(options[name], argparse.BooleanOptionalAction)


def test_shared_eval_options_are_the_training_ones():
    train = {f.name: f for f in dataclasses.fields(MGRPOConfig)}
    evals = {f.name: f for f in dataclasses.fields(EvalConfig)}
    for name, source in SHARED.items():
        assert evals[name].metadata == train[source].metadata, name
        assert _default(evals[name]) == _default(train[source]), name
    unshared = set(evals) - set(SHARED)  # the eval-only options document themselves
    assert all(evals[n].metadata["help"] not in {f.metadata["help"] for f in train.values()} for n in unshared)


def test_parsed_flags_match_the_dataclass_defaults_and_values():
    assert parse_config([]) == MGRPOConfig()
    assert eval_cli.parse_eval_config([]) == EvalConfig()
    cfg = eval_cli.parse_eval_config(["--no-progress", "--phrase", "3", "--stop", "a", "b", "--top-p", "0.5"])
    assert (cfg.progress, cfg.stop, cfg.top_p) == (False, ["a", "b"], 0.5)
    assert cfg.phrase == MGRPOConfig().guiding_phrases[3]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_then_flags(tmp_path, suffix):
    rng = random.Random(len(suffix))
    values = {"group_size": rng.randint(2, 9), "seed": rng.randint(0, 99), "learning_rate": 3e-5,
              "loss_type": "dapo", "guiding_phrases": ["Check it."], "fsdp": True}
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    flag_seed = values["seed"] + 1
    cfg = parse_config(["--config", str(path), "--seed", str(flag_seed), "--no-fsdp"])
    assert cfg == MGRPOConfig(**{**values, "seed": flag_seed, "fsdp": False})
    assert cfg.group_size == values["group_size"] and cfg.loss_type == "dapo"


@pytest.mark.parametrize("field, value", [
    ("group_size", 1), ("l2_samples", 0), ("max_steps", 0), ("eval_limit", 0), ("loss_memory_mib", 0),
    ("prompt_shots", -1), ("top_k", -2), ("top_p", 0.0), ("temperature", -0.5), ("beta", -1.0),
    ("learning_rate", 0.0), ("loss_type", "ppo"), ("layers", 3), ("epsilon_low", math.nan),
    ("shaping_alpha", math.inf), ("sampler_is_cap", 0.0), ("precision", "fp16"),
])
def test_bad_values_raise_an_error_naming_the_option(field, value):
    with pytest.raises(ConfigError, match=field):
        MGRPOConfig(**{field: value})
    flag = "--" + field.replace("_", "-")
    if MGRPOConfig.__dataclass_fields__[field].metadata["choices"]:  # argparse refuses it first
        with pytest.raises(SystemExit):
            parse_config([flag, str(value)])
    else:
        with pytest.raises(ConfigError, match=field):
            parse_config([flag, str(value)])


@pytest.mark.parametrize("field, value, named", [
    ("limit", 0, "limit"), ("batch_size", 0, "batch_size"), ("top_k", -1, "top_k"), ("pass_k", -1, "pass_k"),
    ("pass_k_temperature", 0.0, "pass-k-temperature"), ("top_p", 1.5, "top_p"), ("samples", 2, "--temperature"),
    ("device", "gpu:x", "device"), ("temperature", math.nan, "temperature"),
])
def test_bad_eval_values_name_the_option(field, value, named, capsys):
    with pytest.raises(ConfigError, match=named):
        EvalConfig(**{field: value})
    with pytest.raises(SystemExit) as e:
        eval_cli.parse_eval_config(["--" + field.replace("_", "-"), str(value)])
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_config_file_errors_name_the_key(tmp_path):
    (tmp_path / "a.yaml").write_text("group_sise: 4\n")
    with pytest.raises(ConfigError, match="group_sise"):
        parse_config(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "b.json").write_text('{"group_size": "four"}')
    with pytest.raises(ConfigError, match="group_size"):
        parse_config(["--config", str(tmp_path / "b.json")])


def _random_config(rng: random.Random) -> MGRPOConfig:
    """Every field away from its default (valid values, drawn from `rng`)."""
    values = {}
    for f in dataclasses.fields(MGRPOConfig):
        default, choices = _default(f), f.metadata["choices"]
        if choices:
            values[f.name] = rng.choice([c for c in choices if c != default])
        elif _field_type(MGRPOConfig, f) is bool:  # None (an automatic default) included
            # overwrite is refused with resume, fsdp with lora_rank
            values[f.name] = default if f.name in ("overwrite", "fsdp") else default is not True
        elif isinstance(default, int):
            values[f.name] = default + rng.randint(1, 5)
        elif isinstance(default, float) or f.name in ("delta", "sampler_is_cap"):
            values[f.name] = rng.uniform(0.01, 0.99)
        elif f.name == "device":  # a device torch knows
            values[f.name] = rng.choice(["cpu", "cuda", f"cuda:{rng.randint(1, 7)}"])
        elif isinstance(default, list) or f.name == "stop":
            values[f.name] = [f"text {rng.randint(0, 99)}", "\n\n"]
        else:
            values[f.name] = f"{f.name}-{rng.randint(0, 99)}"
    return MGRPOConfig(**values)


def test_to_dict_from_dict_round_trip(_seed):
    rng = random.Random(_seed)
    cfg = _random_config(rng)
    saved = json.loads(json.dumps(cfg.to_dict()))  # as in config.json and checkpoints
    assert set(saved) == {f.name for f in dataclasses.fields(MGRPOConfig)}
    assert all(saved[k] != v for k, v in MGRPOConfig().to_dict().items() if k not in ("overwrite", "fsdp"))
    again = MGRPOConfig.from_dict(saved)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert isinstance(MGRPOConfig.from_dict({"learning_rate": 1}).learning_rate, float)
    with pytest.raises(ConfigError, match="not_an_option"):
        MGRPOConfig.from_dict({**saved, "not_an_option": 1})
    with pytest.raises(ConfigError, match="max_steps"):
        MGRPOConfig.from_dict({**saved, "max_steps": "3"})
