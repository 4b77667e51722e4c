"""`--head auto` (issue 27): stage 1's cross-validation compares a Flatten head with GAP (the prior)
on the same images and folds, and the model gets the chosen head, on every worker."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgeft.core.config import build_config

FEAT = (2, 2, 4)   # backbone features [h, w, c]


class _Set:
    def __init__(self, y):
        self.y = np.asarray(y)

    def __len__(self):
        return len(self.y)


def _choose(tmp_path, spatial: bool, n_img=90, views=2, seed=0):
    """choose_settings on synthetic cached features. `spatial`: each class is a bump at its own
    position of the 2 x 2 map, the same in every channel, so the positions' mean (GAP) is the same for
    every class and only Flatten can tell them; otherwise each class is a channel pattern, the same at
    every position (GAP's average removes the positions' noise)."""
    from edgeft.train.stage1 import Features, choose_settings

    rng = np.random.default_rng(seed)
    y = np.arange(n_img) % 3
    if spatial:
        centres = np.zeros((3,) + FEAT, np.float32)
        for k in range(3):
            centres[k, k // 2, k % 2, :] = 3.0
            centres[k] -= centres[k].mean()   # every class: the same mean per channel
    else:
        centres = np.repeat(np.repeat(rng.normal(0, 1.5, (3, 1, 1, FEAT[2])), 2, 1), 2, 2).astype(np.float32)
    feats = Features(n_img * views, FEAT, tmp_path / "f.f32")
    for v in range(views):
        feats.put(v * n_img, centres[y] + rng.normal(0, 1.0, (n_img,) + FEAT).astype(np.float32))
    cfg = build_config({"head": "auto", "augment_policy": "photo", "label_smoothing": 0.0, "head_epochs": 30,
                        "seed": 1})
    splits = SimpleNamespace(train=_Set(y), classes=["a", "b", "c"])
    return choose_settings(feats, np.zeros(n_img * views, bool), splits, cfg, views, 16)


def test_auto_head_takes_flatten_only_when_a_paired_test_says_it_is_better(tmp_path):
    c = _choose(tmp_path, spatial=True)   # GAP sees no class at all: Flatten wins clearly
    gap, flat = c.head_scores["gap"], c.head_scores["flatten"]
    assert c.head == "flatten", c.head_scores
    assert flat["correct"] > 0.8 * flat["n"] and gap["correct"] < 0.6 * gap["n"], c.head_scores
    assert flat["p_vs_prior"] < 0.001 and gap["n"] == flat["n"] == 90   # the same held-out images, paired
    assert c.lr_head == flat["lr_head"]
    c = _choose(tmp_path, spatial=False)   # both learn it: no clear advantage, the prior stays
    gap, flat = c.head_scores["gap"], c.head_scores["flatten"]
    assert gap["correct"] > 0.8 * gap["n"], c.head_scores
    assert c.head == "gap" and (flat["correct"] <= gap["correct"] or flat["p_vs_prior"] >= 0.05), c.head_scores


def test_a_one_by_one_feature_map_compares_no_head(tmp_path):
    """Flatten of a 1 x 1 map is GAP: no Flatten heads are trained; the other knobs are still chosen."""
    from edgeft.train.stage1 import Features, choose_settings

    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    feats = Features(30, (1, 1, 4), tmp_path / "f.f32")
    feats.put(0, rng.normal(0, 1, (30, 1, 1, 4)).astype(np.float32) + y[:, None, None, None])
    splits = SimpleNamespace(train=_Set(y), classes=["a", "b", "c"])
    c = choose_settings(feats, np.zeros(30, bool), splits, build_config({"head": "auto", "head_epochs": 2}), 1, 16)
    assert c.head == "gap" and c.head_scores is None
    fixed = build_config({"head": "auto", "head_epochs": 2, "augment_policy": "none", "label_smoothing": 0.0,
                          "lr_head": 1e-3})
    assert choose_settings(feats, np.zeros(30, bool), splits, fixed, 1, 16) is None


def test_a_fixed_head_is_not_compared(tmp_path, monkeypatch):
    from edgeft.train import stage1

    called = []
    monkeypatch.setattr(stage1, "_against_prior_head", lambda *a, **k: called.append(a))
    from edgeft.train.stage1 import _apply_choice

    cfg = build_config({"head": "flatten"})
    assert _apply_choice(cfg, "photo", 0.0, 3e-3, "gap").model.head == "flatten"   # the user's head stands
    assert _apply_choice(build_config({"head": "auto"}), "photo", 0.0, 3e-3, None).model.head == "gap"
    assert not called


class _Worker:
    """A scope of one worker of a multi-worker run, in this process: the chief's broadcasts are
    recorded, and replayed to a non-chief worker in the same order."""

    def __init__(self, chief: bool, sent: list, train_cfg):
        from edgeft._keras import tf
        from edgeft.train.distribute import make_scope

        self.is_chief, self.sent, self.workers, self.name = chief, sent, 2, "multiworker"
        self.strategy, self._local = tf.distribute.get_strategy(), make_scope(train_cfg)

    def local(self):
        return self._local

    def broadcast(self, values):
        values = np.asarray(values, np.float32)
        if self.is_chief:
            self.sent.append(values.copy())
            return values
        got = self.sent.pop(0)
        assert got.shape == values.shape, (got.shape, values.shape)   # every worker calls with the same shape
        return got


@pytest.mark.slow   # trains a head on the demo backbone (features at 64 px: 2 x 2 x 1280)
def test_the_chosen_head_is_built_on_every_worker(tmp_path, image_folder, demo_weights, monkeypatch):
    """The choice forced to Flatten (the decision itself: the test above): the chief's model and a
    worker's get a Flatten head with the chief's trained weights, the backbone untouched, and it learned."""
    from conftest import TINY
    from edgeft.data.datasets import load_splits
    from edgeft.nn.model import backbone_layers, build_model, head_kind
    from edgeft.train import stage1
    from edgeft.train.report import evaluate_arrays

    real = stage1.choose_settings

    def forced(*a, **k):
        c = real(*a, **k)
        c.head = "flatten"
        return c

    monkeypatch.setattr(stage1, "choose_settings", forced)
    cfg = build_config({"folder": str(image_folder), "weights": demo_weights, **TINY,
                        "image_size": 64, "head": "auto", "dense": 0, "lr_head": None})
    splits = load_splits(str(image_folder), 64, 0.2, 1)
    sent = []
    models = {}
    for chief in (True, False):
        model = build_model(cfg.model, 64, len(splits.classes))
        assert head_kind(model) == "gap"   # auto builds the prior until stage 1 chooses
        before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone_layers(model)}
        models[chief] = stage1._train_head_on_chief(model, splits, cfg, tmp_path / str(chief),
                                                     _Worker(chief, sent, cfg.train))
        new, got, info = models[chief]
        assert head_kind(new) == got.model.head == info["choice"]["head"] == "flatten"
        assert all(np.array_equal(a, b) for layer in backbone_layers(new)
                   for a, b in zip(before[layer.name], layer.get_weights()))
    assert not sent   # the worker took every broadcast the chief made
    (m1, _, _), (m2, _, _) = models[True], models[False]
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    acc = evaluate_arrays(m2, splits.val, splits.classes)["val_accuracy"]
    assert acc >= 2.0 / len(splits.classes), acc   # learned: twice chance or more


def test_report_shows_both_heads_and_marks_the_gap_tables_pick():
    """report.md's Recipe section: the option table marks the row GAP's choice picked (the final head
    lr may be Flatten's), and a second table gives each head's held-out images right and p."""
    from edgeft.train.report import _recipe_lines

    scores = [{"policy": "photo", "label_smoothing": 0.0, "lr_head": lr, "accuracy": a, "correct": c, "n": 320,
               "p_vs_prior": p} for lr, a, c, p in ((3e-3, 0.38, 121, None), (1e-2, 0.40, 128, 0.03))]
    choice = {"folds": 3, "images": 320, "seconds": 6.4, "policy": "photo", "label_smoothing": 0.0, "lr_head": 3e-3,
              "scores": scores, "head": "flatten",
              "heads": {"gap": {"correct": 128, "n": 320, "lr_head": 1e-2},
                        "flatten": {"correct": 188, "n": 320, "lr_head": 3e-3, "p_vs_prior": 0.0}}}
    text = "\n".join(_recipe_lines({"choice": choice}, build_config({"head": "flatten"})))
    assert "| photo **(chosen)** | 0.0 | 0.01 |" in text and "| photo **(chosen)** | 0.0 | 0.003 |" not in text
    assert "chosen: **flatten**" in text
    assert "| gap | 0.01 | 0.4000 | 128 / 320 | prior |" in text
    assert "| flatten | 0.003 | 0.5875 | 188 / 320 | 0.000 |" in text
