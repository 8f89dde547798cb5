"""Config schema: defaults, YAML + overrides, one clear ConfigError per mistake, round trip."""

import pytest

from leanseg.config import Config, load_config, to_yaml
from leanseg.errors import ConfigError


def test_defaults_load_and_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "synthetic"
    assert cfg.train.iterations > 0


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  iterations: 7\n  seed: 3\nmodel:\n  options: {channels: 32}\n")
    cfg = load_config(path, ["train.iterations=9", "eval.scales=[0.5,1.0]"])
    assert cfg.train.iterations == 9
    assert cfg.train.seed == 3
    assert cfg.eval.scales == [0.5, 1.0]
    assert cfg.model.options["channels"] == 32


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.iteratons=5", "unknown config key 'train.iteratons'"),
        ("trian.iterations=5", "unknown config key 'trian'"),
        ("train.iterations=abc", "config key 'train.iterations': expected int"),
        ("train.compile=maybe", "config key 'train.compile': expected bool"),
        ("train.amp=true", "config key 'train.amp' is now train.precision"),
        ("train.precision=fp8", "'fp8' is not one of ['auto', 'fp32', 'bf16', 'fp16']"),
        ("train.channels_last=maybe", "config key 'train.channels_last'"),
        ("optim.name=lamb", "'lamb' is not one of ['sgd', 'adam', 'adamw']"),
        ("model.output_stride=12", "config key 'model.output_stride'"),
        ("data.crop_size=0", "config key 'data.crop_size': must be > 0"),
        ("eval.mode=slide", "config key 'eval.crop_size'"),
        ("noequals", "not of the form key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*'iterations'"):
        load_config(None, ["train.iteratons=5"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(unsafe)


def test_saved_yaml_reloads_to_an_equal_config(tmp_path):
    cfg = load_config(None, ["train.iterations=11", "model.options.width_mult=0.5"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_base_dict_is_overridden():
    base = load_config(None, ["train.iterations=11"])
    from dataclasses import asdict

    cfg = load_config(None, ["train.seed=5"], base=asdict(base))
    assert (cfg.train.iterations, cfg.train.seed) == (11, 5)


def test_default_options_do_not_leak_into_another_model(tmp_path):
    assert load_config().model.options  # the default model has options
    assert load_config(None, ["model.name=deeplabv3_resnet50"]).model.options == {}
    cfg = load_config(None, ["model.name=deeplabv3_resnet50", "model.options.channels=32"])
    assert cfg.model.options == {"channels": 32}
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: deeplabv3_mobilenetv2\n")
    assert load_config(path).model.options == {}
    # options set without a model name extend the current model's options
    assert load_config(None, ["model.options.channels=32"]).model.options["width_mult"] == 0.5
