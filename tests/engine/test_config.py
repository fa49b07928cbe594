"""kerasdet.engine.config: strict sections, type checks, --set paths, open sections."""
import pytest

from kerasdet.engine.config import (Config, StageConfig, TrainConfig, apply_overrides, check_kwargs, load_config,
                                    parse_overrides)
from kerasdet.engine.recipes import load_recipe
from kerasdet.errors import ConfigError


def _retinanet(overrides=None):
    return load_recipe("retinanet").config("digits", overrides)


def test_misspelt_keys_name_key_section_and_close_matches():
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' in section 'train'; did you mean 'epochs'"):
        _retinanet({"train.epoch": 3})
    with pytest.raises(ConfigError, match=r"'fpn_channel' in section 'model'; did you mean 'fpn_channels'"):
        _retinanet({"model.fpn_channel": 3})
    with pytest.raises(ConfigError, match=r"'widthz' in section 'backbone'; did you mean 'widths'"):
        _retinanet({"backbone.widthz": [1]})
    with pytest.raises(ConfigError, match=r"'num_trian' in section 'data.generate'; did you mean 'num_train'"):
        _retinanet({"data.generate.num_trian": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'trian' in section '<top level>'; did you mean 'train'"):
        _retinanet({"trian.epochs": 3})
    with pytest.raises(ConfigError, match=r"'lrr' in section 'train.stages.0'"):
        load_config({"train": {"stages": [{"name": "a", "lrr": 1}]}})


def test_values_are_type_checked():
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, got str 'abc'"):
        _retinanet({"train.lr": "abc"})
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer"):
        _retinanet({"train.batch_size": 2.5})
    with pytest.raises(ConfigError, match=r"input.flip: expected true or false"):
        _retinanet({"input.flip": "yes"})
    with pytest.raises(ConfigError, match=r"train.optimizer: 'rmsprop' is not one of"):
        _retinanet({"train.optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match=r"input.image_size: expected 2 values"):
        _retinanet({"input.image_size": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"model.fpn_channels: expected an integer"):
        _retinanet({"model.fpn_channels": "wide"})
    with pytest.raises(ConfigError, match=r"eval.metric: 'voc' is not one of"):
        _retinanet({"eval.metric": "voc"})
    config = _retinanet({"train.lr": 1, "train.batch_size": 4.0, "input.image_size": [64, 64]})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.batch_size == 4 and config.input.image_size == (64, 64)


def test_overrides_parse_json_and_index_stages():
    assert parse_overrides(["a.b=3", "a.c=[1,2]", "a.d=text", "a.e=null", "a.f=true"]) == {
        "a.b": 3, "a.c": [1, 2], "a.d": "text", "a.e": None, "a.f": True}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.epochs"])
    smn = load_recipe("smn")
    config = smn.config("digits", {"train.stages.2.lr": 5e-4, "train.stages.2.params.num_steps": 3})
    assert config.train.stages[2].lr == 5e-4 and config.train.stages[2].params == {"num_steps": 3}
    with pytest.raises(ConfigError, match=r"train.stages has 5 entries; '9' is not an index"):
        smn.config("digits", {"train.stages.9.lr": 1.0})
    with pytest.raises(ConfigError, match=r"'num_step' in section 'train.stages.2.params'"):
        smn.config("digits", {"train.stages.2.params.num_step": 3})
    with pytest.raises(ConfigError, match=r"'fc_dimm' in section 'base'"):
        smn.config("digits", {"base.fc_dimm": 3})
    assert smn.config("digits", {"base.weights": "x.h5"}).section("base")["weights"] == "x.h5"
    preset = {"train": {"decay_at": (0.5,)}}
    assert apply_overrides(preset, {"train.lr": 2}, ["train"]) == {"train": {"decay_at": [0.5], "lr": 2}}
    assert preset == {"train": {"decay_at": (0.5,)}}  # the preset itself is not touched


def test_stages_inherit_train_fields_and_round_trip():
    train = TrainConfig(lr=0.1, epochs=3, decay_at=(0.5,), stages=(StageConfig(name="a", lr=0.2),
                                                                     StageConfig(name="b", steps=7)))
    a, b = train.resolved_stages()
    assert (a.lr, a.epochs, a.decay_at, a.steps) == (0.2, 3, (0.5,), None)
    assert (b.lr, b.steps) == (0.1, 7)
    single, = TrainConfig(epochs=2).resolved_stages()
    assert (single.name, single.kind, single.epochs) == ("train", "train", 2)
    with pytest.raises(ConfigError, match="stage names must be unique"):
        load_config({"train": {"stages": [{"name": "a"}, {"name": "a"}]}})
    for name, preset in [("retinanet", "digits"), ("smn", "digits"), ("decompnet", "digits"), ("couplenet", "couplenet")]:
        recipe = load_recipe(name)
        config = recipe.config(preset)
        assert isinstance(config, Config)
        assert recipe.config_from_dict(config.to_dict()) == config  # run.json's config gives the same config


def test_check_kwargs_against_a_signature():
    def builder(*, width=8, rate=0.5, name="x", flag=False, sizes=(1, 2), anything=None, **rest):
        return None

    assert check_kwargs(builder, {"width": 3, "rate": 1, "anything": "a"}, "s") == {"width": 3, "rate": 1.0,
                                                                                   "anything": "a"}
    with pytest.raises(ConfigError, match=r"s.flag: expected true or false"):
        check_kwargs(builder, {"flag": 1}, "s")
    with pytest.raises(ConfigError, match=r"s.sizes: expected a list"):
        check_kwargs(builder, {"sizes": 3}, "s")
    with pytest.raises(ConfigError, match=r"unknown key 'widht' in section 's'; did you mean 'width'"):
        check_kwargs(builder, {"widht": 3}, "s")
    assert check_kwargs(builder, {"weights": "p"}, "s", extra={"weights": None}) == {"weights": "p"}


def test_model_weights_keys_only_for_models_built_from_a_backbone():
    """``model.weights`` / ``model.freeze`` are applied by ``build_detector``; the recipes
    whose model is not ``backbone`` + the rest reject them as unknown keys (one line)."""
    assert load_recipe("retinanet").config("digits", {"model.freeze": "backbone"}).model["freeze"] == "backbone"
    for name, key in (("smn", "model.freeze"), ("decompnet", "model.weights")):
        with pytest.raises(ConfigError, match=f"unknown key '{key.split('.')[1]}' in section 'model'"):
            load_recipe(name).config("digits", {key: "backbone"})
