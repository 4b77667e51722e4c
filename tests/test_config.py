"""One config object: flags, YAML and the run's config.yaml describe the same thing."""
import pytest
import yaml

from edgeft.cli.app import FINETUNE_SECTIONS, build_parser
from edgeft.cli.flags import _config_keys, config_from_args
from edgeft.core.config import EdgeftConfig, build_config, from_yaml_file, to_yaml
from edgeft.core.errors import UserError


def test_yaml_round_trip(tmp_path):
    cfg = build_config({"folder": "/data/flowers", "backbone": "vgg16", "head": "flatten", "dense": 256,
                        "dropout": 0.5, "lr_head": 1e-4, "unfreeze": "block5_conv1", "augment": True,
                        "qat_epochs": 2, "max_accuracy_drop": 2.5, "parity_augment": "flip"})
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert from_yaml_file(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["backbone"] == "vgg16"


def test_flat_and_nested_keys_agree():
    flat = build_config({"backbone": "mobilenet", "lr-finetune": "3e-6", "val_split": 0.1})
    nested = build_config({"model": {"backbone": "mobilenet"}, "train": {"lr_finetune": 3e-6},
                           "data": {"val_split": 0.1}})
    assert flat == nested and flat.train.lr_finetune == 3e-6


@pytest.mark.parametrize("values, message", [
    ({"bogus": 1}, "unknown config key"), ({"head": "avg"}, "not one of"), ({"val_split": 1.5}, "val-split"),
    ({"dense": "many"}, "not a valid"), ({"lr_head": 0}, "positive"), ({"augment": "maybe"}, "not a valid"),
])
def test_bad_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: vgg16\nlr_head: 0.001\ntrain:\n  head_epochs: 7\n")
    args = build_parser().parse_args(["finetune", "--config", str(path), "--lr-head", "0.01", "--no-augment"])
    cfg = config_from_args(args, _config_keys(FINETUNE_SECTIONS))
    assert cfg.model.backbone == "vgg16" and cfg.train.head_epochs == 7
    assert cfg.train.lr_head == 0.01 and cfg.data.augment_policy == "none"   # --no-augment: earlier versions' flag


def test_seed_recipe_is_the_seed_where_it_has_one():
    # the defaults were the seed's until the default recipe (issue 19); `--recipe seed` keeps them
    cfg = build_config({"recipe": "seed"})
    assert (cfg.model.dense, cfg.model.dropout, cfg.train.lr_head, cfg.train.lr_finetune) == (256, 0.5, 1e-4, 1e-5)
    assert EdgeftConfig().model.dropout == 0.2 and EdgeftConfig().train.lr_head is None   # default: chosen


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    out = capsys.readouterr().out
    for key in _config_keys(FINETUNE_SECTIONS) - {"folder"}:
        flag = {"val_dir": "--val", "test_dir": "--test"}.get(key, "--" + key.replace("_", "-"))
        assert flag in out, flag
