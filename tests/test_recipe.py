"""The default recipe (issue 19): named augmentation policies, cached augmented views, the choice
by cross-validation, label smoothing, class weights, whole-block unfreezing, --recipe seed, and
old runs read as what they did. tools/bench_recipe.py holds the accuracy measurement."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeft.core.config import BEFORE_RECIPE, SEED_RECIPE, build_config, from_yaml_file
from edgeft.core.errors import UserError
from edgeft.train.choose import LR_HEAD_OPTIONS


# ---------------------------------------------------------------- config
def test_seed_recipe_sets_the_seed_values_and_a_key_beside_it_wins():
    cfg = build_config({"recipe": "seed"})
    flat = {**vars(cfg.data), **vars(cfg.model), **vars(cfg.train)}
    assert {k: flat[k] for k in SEED_RECIPE} == SEED_RECIPE
    assert (cfg.model.head, cfg.model.dense, cfg.model.dropout, cfg.train.lr_head) == ("flatten", 256, 0.5, 1e-4)
    mixed = build_config({"recipe": "seed", "dense": 64, "augment_policy": "upright"})
    assert mixed.model.dense == 64 and mixed.data.augment_policy == "upright" and mixed.model.dropout == 0.5


def test_default_recipe_leaves_the_data_dependent_knobs_at_auto():
    cfg = build_config({})
    assert cfg.train.recipe == "default"
    assert (cfg.data.augment_policy, cfg.data.augment_views, cfg.train.label_smoothing, cfg.train.lr_head,
            cfg.train.head_epochs, cfg.train.finetune_epochs, cfg.train.class_weight) == (
        "auto", None, None, None, None, None, "auto")
    assert (cfg.model.head, cfg.model.dense, cfg.model.dropout, cfg.model.l2) == ("auto", 0, 0.2, 1e-4)
    assert cfg.train.unfreeze == "blocks:0.3" and cfg.train.warmup == 0.1
    assert build_config({"label_smoothing": "auto", "augment_views": "auto"}).train.label_smoothing is None


@pytest.mark.parametrize("values, match", [
    ({"augment_policy": "sepia"}, "not one of"), ({"recipe": "fancy"}, "not one of"),
    ({"augment_views": 0}, "augment-views"), ({"augment_views": -2}, "augment-views"),
    ({"label_smoothing": 1.0}, "label-smoothing"), ({"label_smoothing": -0.1}, "label-smoothing"),
    ({"warmup": 1.5}, "warmup"), ({"l2": -1}, "l2")])   # a bad blocks: spec: test_unfreeze_whole_blocks
def test_bad_recipe_values_are_one_line_errors(values, match):
    with pytest.raises(UserError, match=match):
        build_config(values)


@pytest.mark.parametrize("flag", [["--augment-policy", "sepia"], ["--augment-views", "0"], ["--recipe", "x"],
                                  ["--label-smoothing", "1"]])
def test_bad_recipe_flags_exit_2(tmp_path, flag):
    p = subprocess.run([sys.executable, "-m", "edgeft", "finetune", str(tmp_path), "--out", str(tmp_path / "r"),
                        *flag], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert len([ln for ln in p.stderr.strip().splitlines() if ln.startswith(("edgeft", "usage"))]) >= 1


def test_old_run_config_reads_as_what_the_run_did(tmp_path):
    # a config.yaml of a run made before the recipe: every key it had, none of the new ones
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  folder: /x\n  augment: false\n  image_size: 32\nmodel:\n  head: gap\n  dense: 256\n"
                   "  dropout: 0.5\ntrain:\n  head_epochs: 10\n  lr_head: 0.0001\n  finetune_epochs: 10\n")
    cfg = from_yaml_file(old)
    assert cfg.data.augment_policy == "none" and cfg.data.augment_views == 1 and not cfg.data.augment_online
    assert cfg.train.label_smoothing == 0.0 and cfg.train.class_weight == "none" and cfg.train.warmup == 0.0
    assert cfg.model.l2 == 0.0 and cfg.train.head_schedule == "constant"
    assert (cfg.model.head, cfg.model.dense, cfg.train.lr_head) == ("gap", 256, 1e-4)   # its own keys kept
    old.write_text(old.read_text().replace("  head: gap\n", ""))
    assert from_yaml_file(old).model.head == "gap"   # no head key: GAP, the default before --head auto
    old.write_text(old.read_text().replace("augment: false", "augment: true"))
    cfg = from_yaml_file(old)
    assert cfg.data.augment_policy == "flip-rotate-zoom" and cfg.data.augment_online
    assert set(BEFORE_RECIPE) <= {f for sec in ("data", "model", "train") for f in vars(getattr(cfg, sec))}


def test_parity_copies_mirror_only_when_the_policy_mirrors():
    from edgeft.data.datasets import parity_policy

    assert parity_policy(build_config({"augment_policy": "photo"})) == "flip"
    assert parity_policy(build_config({"augment_policy": "upright"})) == "mild"
    assert parity_policy(build_config({"augment_policy": "none"})) == "mild"
    assert parity_policy(build_config({"augment": True})) == "flip"   # earlier versions' --augment


# ---------------------------------------------------------------- augmentation
def test_augment_batch_mirrors_exactly_the_rows_flips_names():
    from edgeft.data.augment import Policy, augment_batch, flips, view_uniforms

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
    u = view_uniforms(6, seed=1, view=1)
    mirror_only = Policy("t", flip=True)
    out = augment_batch(x, u, mirror_only).numpy()
    f = flips(mirror_only, u)
    assert 0 < f.sum() < 6
    np.testing.assert_allclose(out[f], x[f][:, :, ::-1], atol=1e-3)
    np.testing.assert_allclose(out[~f], x[~f], atol=1e-3)
    assert not flips(Policy("u"), u).any()


def test_policies_change_training_pixels_only_within_range():
    from edgeft.data.augment import POLICIES, augment_batch, view_uniforms

    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    for name in ("photo", "upright"):
        out = augment_batch(x, view_uniforms(4, 2, 1), POLICIES[name]).numpy()
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
        assert np.abs(out - x).mean() > 1.0   # the crop / colour did something
    assert augment_batch(x, view_uniforms(4, 2, 1), POLICIES["none"]) is x


def test_views_are_reproducible_and_differ_between_views():
    from edgeft.data.augment import view_uniforms

    np.testing.assert_array_equal(view_uniforms(5, 3, 1), view_uniforms(5, 3, 1))
    assert not np.allclose(view_uniforms(5, 3, 1), view_uniforms(5, 3, 2))


# ---------------------------------------------------------------- the choice
def _rows(n_img=90, views=3, flip_hurts=True, seed=0):
    """Synthetic features: 3 classes as clusters; a mirrored view of class c looks like class
    (c + 1) % 3 when flips hurt (a mirrored digit is another shape), like c itself otherwise."""
    from edgeft.train.choose import Rows

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, 16)).astype(np.float32) * 3
    y_img = np.arange(n_img) % 3
    xs, ys, im, vw, fl = [], [], [], [], []
    for v in range(views):
        flipped = (rng.random(n_img) < 0.5) if v else np.zeros(n_img, bool)
        looks = np.where(flipped & flip_hurts, (y_img + 1) % 3, y_img)
        xs.append(centres[looks] + rng.normal(0, 1.0, (n_img, 16)).astype(np.float32))
        ys.append(y_img), im.append(np.arange(n_img)), vw.append(np.full(n_img, v)), fl.append(flipped)
    return Rows(np.concatenate(xs), np.concatenate(ys), np.concatenate(im), np.concatenate(vw),
                np.concatenate(fl), rng.random(n_img * views) < 0.5)


def _choose(rows, arms=("photo", "upright"), smoothings=(0.0,), lrs=(1e-2,)):
    from edgeft.train.choose import choose

    return choose(rows, 3, arms=arms, smoothings=smoothings, lrs=lrs, epochs=8, batch=16, dropout=0.0, l2=0.0,
                  dense=0, warmup=0.1, schedule="cosine", class_weights=None, seed=1)


def test_choice_drops_flips_when_mirrored_views_look_like_another_class():
    c = _choose(_rows(flip_hurts=True))
    scores = {s["policy"]: s["accuracy"] for s in c.scores}
    assert c.policy == "upright" and scores["upright"] > scores["photo"], scores
    assert c.images == 90 and all(s["n"] == 90 for s in c.scores)   # scored on every image once


def test_choice_scores_on_held_out_images_only():
    from edgeft.train.choose import folds_by_image

    fold = folds_by_image(np.arange(60) % 3, 3, seed=2)
    assert all(19 <= k <= 21 for k in np.bincount(fold))   # balanced to one image
    for c in range(3):   # stratified: every class in every fold
        assert set(fold[np.arange(60) % 3 == c]) == {0, 1, 2}
    # labels shuffled against the features: nothing to learn, so held-out accuracy is near chance
    rows = _rows(flip_hurts=False)
    rows.y = np.tile(np.random.default_rng(4).integers(0, 3, 90), 3)   # every view keeps its image's label
    c = _choose(rows, arms=("photo",))
    assert max(s["accuracy"] for s in c.scores) < 0.6


def test_choice_prefers_the_listed_default_on_a_tie():
    rows = _rows(flip_hurts=False)
    c = _choose(rows, arms=("upright",), lrs=(1e-2, 1e-2))
    assert c.lr_head == 1e-2 and c.scores[0]["correct"] == c.scores[1]["correct"]


# ---------------------------------------------------------------- loss, weights, schedule, blocks
def test_smoothed_sparse_loss_is_keras_categorical_with_smoothing():
    from edgeft._keras import keras, tf
    from edgeft.layers import SmoothedSparseCrossentropy, training_loss

    y = np.array([0, 2, 1])
    p = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    want = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(tf.one_hot(y, 3), p)
    np.testing.assert_allclose(SmoothedSparseCrossentropy(0.1)(y, p), want, rtol=1e-6)
    assert training_loss(0.0) == "sparse_categorical_crossentropy"
    restored = keras.losses.deserialize(keras.losses.serialize(SmoothedSparseCrossentropy(0.1)))
    assert restored.label_smoothing == 0.1


def test_class_weights_only_for_imbalanced_training_data():
    from edgeft.train.recipe import class_weight_dict, resolve_for_data

    cfg = build_config({})
    balanced = np.repeat(np.arange(3), [40, 30, 20])
    skewed = np.repeat(np.arange(3), [100, 30, 20])
    assert class_weight_dict(cfg, balanced, 3) is None
    w = class_weight_dict(cfg, skewed, 3)
    assert w[2] > w[1] > w[0] and abs(sum(w[c] * n for c, n in enumerate([100, 30, 20])) - 150) < 1e-6
    assert resolve_for_data(cfg, 150, skewed, 3).train.class_weight == "balanced"
    assert resolve_for_data(cfg, 90, balanced, 3).train.class_weight == "none"
    assert class_weight_dict(build_config({"class_weight": "none"}), skewed, 3) is None


def test_views_and_epochs_follow_the_folder_size():
    from edgeft.train.recipe import finetune_epochs_for, head_epochs_for, resolve_for_data, views_for

    assert views_for(300) >= views_for(1000) >= views_for(3000) >= 2
    assert head_epochs_for(200, 32) >= head_epochs_for(20000, 32)
    assert finetune_epochs_for(300, 32) > finetune_epochs_for(20000, 32)
    y = np.arange(300) % 3
    assert resolve_for_data(build_config({"augment_policy": "none"}), 300, y, 3).data.augment_views == 1
    assert resolve_for_data(build_config({"augment_views": 7}), 300, y, 3).data.augment_views == 7


def test_warmup_then_cosine():
    from edgeft.train.recipe import lr_schedule

    s = lr_schedule(1e-3, 100, 0.1, "cosine")
    lrs = [float(s(t)) for t in (0, 5, 10, 55, 99)]
    assert lrs[0] == 0.0 and abs(lrs[1] - 5e-4) < 1e-9 and abs(lrs[2] - 1e-3) < 1e-9
    assert lrs[3] < lrs[2] and lrs[4] < 1e-5
    const = lr_schedule(1e-3, 100, 0.1, "constant")
    assert abs(float(const(50)) - 1e-3) < 1e-9 and float(const(0)) == 0.0
    assert lr_schedule(1e-4, 100, 0.0, "constant") == 1e-4   # the seed's Adam(1e-4)


def test_unfreeze_whole_blocks():
    from edgeft.core.registry import get_backbone
    from edgeft.nn.model import backbone_blocks, backbone_layers, build_model, select_unfreeze

    cfg = build_config({"backbone": "mobilenet_v2", "alpha": 0.35, "weights": "none"})
    m = build_model(cfg.model, 32, 3)
    names = [layer.name for layer in backbone_layers(m)]
    blocks = backbone_blocks(names, get_backbone("mobilenet_v2"))
    assert sum(map(len, blocks)) == len(names) and blocks[-1][0] == "block_16_expand"
    assert "out_relu" in blocks[-1]
    top2 = select_unfreeze(m, "blocks:2")
    assert top2 == blocks[-2] + blocks[-1]
    frac = select_unfreeze(m, "blocks:0.3")
    assert len(frac) >= 0.3 * len(names) and frac[0].endswith("_expand")   # starts at a block's first layer
    assert len(select_unfreeze(m, "0.3")) == np.ceil(0.3 * len(names))     # the old spec still cuts anywhere
    with pytest.raises(UserError, match="blocks"):
        select_unfreeze(m, "blocks:x")


@pytest.mark.slow
def test_default_recipe_end_to_end(tmp_path, image_folder, demo_weights):
    """A tiny run with the default recipe: views cached, the choice measured and recorded in
    config.yaml (nothing left at auto), metrics.json and report.md; the model loads."""
    import edgeft
    from edgeft.core.rundir import read_json

    out = tmp_path / "run"
    r = edgeft.finetune({"folder": str(image_folder), "weights": demo_weights, "backbone": "mobilenet_v2",
                         "alpha": 0.35, "image_size": 32, "batch_size": 16, "finetune_epochs": 1,
                         "label_smoothing": "auto", "seed": 1,
                         # a stage-2 rate that wrecks the backbone: the guard keeps stage 1's weights
                         "lr_finetune": 0.03, "unfreeze": "blocks:2"}, out=out)
    cfg = from_yaml_file(out / "config.yaml")
    assert cfg.data.augment_policy in ("photo", "upright", "none") and cfg.data.augment_views >= 2
    assert cfg.train.label_smoothing in (0.0, 0.1) and cfg.train.lr_head in LR_HEAD_OPTIONS
    assert cfg.train.head_epochs >= 5 and cfg.train.class_weight in ("none", "balanced")
    head = read_json(out / "metrics.json")["head"]
    assert head["views"] == cfg.data.augment_views and len(head["choice"]["scores"]) == 12
    assert head["choice"]["policy"] == cfg.data.augment_policy
    # the final head trains on the views the chosen policy keeps (view 0 alone for none)
    none = head["choice"]["policy"] == "none"
    assert (head["rows"] == head["choice"]["images"]) if none else (head["rows"] > head["choice"]["images"])
    assert r.metrics["head"]["views"] == head["views"]
    report = (out / "report.md").read_text()
    assert "## Recipe" in report and "(chosen)" in report
    model = edgeft.load_model(out / "model.keras")
    assert model.get_layer("predictions").kernel_regularizer is not None
    ft = read_json(out / "metrics.json")["finetune"]
    assert ft["kept_stage1"] and ft["stage2_val_loss"] > head["val_loss"]
    assert ft["val_loss"] == pytest.approx(head["val_loss"], abs=1e-6)   # stage 1's weights, evaluated again


def test_views_by_the_backbones_cost_keep_stage_1_one_pass_on_vgg16_at_224():
    """Issue 27 item 4: K cached views cost K backbone passes; on VGG16 at 224 px (15.3 G multiply-
    accumulates an image) the extra views would make stage 1 four passes, under 5x faster than the
    seed's 10-epoch loop, so a folder of 290 images gets one view; cheap backbones keep K by size."""
    from edgeft.train.recipe import EXTRA_VIEW_MACS, views_for

    vgg16, lite0 = 15.347e9, 0.384e9
    assert [views_for(n) for n in (290, 600, 1500, 5000)] == [4, 4, 3, 2]            # by size alone
    assert [views_for(n, lite0) for n in (290, 600, 1500, 5000)] == [4, 4, 3, 2]     # Lite0 at 224: unchanged
    assert views_for(290, vgg16) == 1 and views_for(100, vgg16) == 2 and views_for(30, vgg16) == 4
    for n in (30, 100, 290, 5000):   # what the extra views cost never passes the budget
        assert (views_for(n, vgg16) - 1) * n * vgg16 <= EXTRA_VIEW_MACS


def test_backbone_macs_counts_convolutions_depthwise_and_dense_layers():
    from edgeft._keras import keras
    from edgeft.train.recipe import backbone_macs

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)                       # 8*8 * 3*3*3*4 = 6912
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)        # 4*4 * 3*3*4 = 576
    inner = keras.Model(x, keras.layers.Conv2D(6, 1)(x))                     # nested: 4*4 * 4*6 = 384
    y = keras.layers.Flatten()(inner(x))
    model = keras.Model(inp, keras.layers.Dense(5)(y))                        # 96*5 = 480
    assert backbone_macs(model) == 6912 + 576 + 384 + 480
