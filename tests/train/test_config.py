"""Config files, command-line overrides (typed, nearest-key errors), smoke shrinking, CLI errors."""
import pathlib

import pytest

from train import config_lib
from train.main import main, parse_args

QUICKSTART = str(pathlib.Path(__file__).resolve().parents[2] / "train" / "configs" / "quickstart.py")


def test_quickstart_loads_with_arg_and_overrides():
    config = config_lib.resolve_config(QUICKSTART + ":steps=7,batch=64",
                                       ["optimizer.learning_rate=3e-4", "model.overrides.depth=2", "ema_decay=0.99",
                                        "optimizer.no_decay_names=('pos_embed',)", "input.data_dir=/data"])
    assert config.num_train_steps == 7 and config.batch_size == 64
    assert config.optimizer.learning_rate == pytest.approx(3e-4)
    assert isinstance(config.optimizer.learning_rate, float)
    assert config.model.overrides.depth == 2
    assert config.ema_decay == pytest.approx(0.99)
    assert tuple(config.optimizer.no_decay_names) == ("pos_embed",)
    assert config.input.data_dir == "/data"


def test_unknown_key_names_the_nearest():
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optimizer.learning_rate'"):
        config_lib.resolve_config(QUICKSTART, ["optimizer.learning_rat=1"])
    with pytest.raises(config_lib.ConfigError, match="did you mean 'batch_size'"):
        config_lib.resolve_config(QUICKSTART, ["batch_sise=8"])
    with pytest.raises(config_lib.ConfigError, match="is a section"):
        config_lib.resolve_config(QUICKSTART, ["optimizer=3"])


def test_bad_values_are_rejected():
    with pytest.raises(config_lib.ConfigError, match="bool"):
        config_lib.resolve_config(QUICKSTART, ["remat=maybe"])
    with pytest.raises(config_lib.ConfigError, match="expects a int"):
        config_lib.resolve_config(QUICKSTART, ["batch_size=big"])
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'stepz'.*did you mean 'steps'"):
        config_lib.resolve_config(QUICKSTART + ":stepz=3")
    with pytest.raises(config_lib.ConfigError, match="no config file"):
        config_lib.resolve_config("train/configs/nope.py")


def test_smoke_shrinks_and_explicit_overrides_win():
    full = config_lib.resolve_config(QUICKSTART)
    smoke = config_lib.resolve_config(QUICKSTART, ["smoke=True", "num_train_steps=9"])
    assert full.num_train_steps > 100 and smoke.num_train_steps == 9
    assert smoke.batch_size < full.batch_size
    assert smoke.model.overrides.depth == 1 and full.model.overrides.depth > 1
    assert config_lib.resolve_config(QUICKSTART + ":smoke").model.overrides.depth == 1


def test_cli_parses_both_override_forms():
    args, overrides = parse_args(["--config", "x.py", "--workdir", "w", "--config.seed=3", "--config.batch_size", "8"])
    assert args.config == "x.py" and overrides == ["config.seed=3", "config.batch_size=8"]


def test_cli_unknown_key_is_a_clear_error(tmp_path, capsys):
    rc = main(["--config", QUICKSTART, "--workdir", str(tmp_path), "--config.optimizer.lerning_rate=1"])
    assert rc == 2
    assert "did you mean 'optimizer.learning_rate'" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_to_json_round_trips():
    import json

    data = json.loads(config_lib.to_json(config_lib.resolve_config(QUICKSTART)))
    assert data["model"]["name"] == "vit_tiny_patch16_224" and data["input"]["dataset"] == "digits"
