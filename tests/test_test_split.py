"""The test split: held out before the validation split, never seen by training, reported with its
interval; runs made before it existed keep their train/val split."""
import json

import numpy as np
import pytest
import yaml

from conftest import TINY, run_cli, write_digit_folder
from edgeft.core import rundir
from edgeft.core.config import build_config, from_yaml_file, to_yaml
from edgeft.core.errors import UserError
from edgeft.data.datasets import load_splits, scan_folder, stratified_split
from edgeft.run import run_splits
from edgeft.train.report import NO_TEST_SPLIT


def _old_stratified_split(y: np.ndarray, n_classes: int, val_split: float, seed: int):
    """edgeft's split before it had a test split (copied from the last release): the reference
    an old run's train/val split must keep matching."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(n_classes):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_split))
        if val_split > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.asarray(x, np.uint8).reshape(len(x), -1)}


def test_test_split_is_stratified_disjoint_seeded_and_taken_before_val(image_folder):
    full = scan_folder(str(image_folder), 32)
    tr, va, te = stratified_split(full, 0.2, seed=1, test_split=0.1)
    assert np.bincount(full.y[te], minlength=3).tolist() == [2, 2, 2]      # round(24 * 0.1) per class
    assert np.bincount(full.y[va], minlength=3).tolist() == [4, 4, 4]      # round(22 * 0.2) of what is left
    assert set(tr).isdisjoint(va) and set(tr).isdisjoint(te) and set(va).isdisjoint(te)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(72))
    again = stratified_split(full, 0.2, seed=1, test_split=0.1)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    assert not np.array_equal(te, stratified_split(full, 0.2, seed=2, test_split=0.1)[2])
    # the validation split is drawn from what the test split leaves exactly as it was drawn before
    rest = np.sort(np.concatenate([tr, va]))
    old_tr, old_va = _old_stratified_split(full.y[rest], 3, 0.2, seed=1)
    assert np.array_equal(rest[old_va], va) and np.array_equal(rest[old_tr], tr)
    # test_split 0: the old split, image for image
    tr0, va0, te0 = stratified_split(full, 0.2, seed=1, test_split=0.0)
    old = _old_stratified_split(full.y, 3, 0.2, seed=1)
    assert len(te0) == 0 and np.array_equal(tr0, old[0]) and np.array_equal(va0, old[1])


def test_small_classes_keep_one_test_image_from_three(tmp_path):
    from PIL import Image

    for c, n in (("a", 3), ("b", 2), ("c", 30)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), (7 * i + ord(c)) % 256, np.uint8)).save(tmp_path / c / f"{i}.png")
    s = scan_folder(str(tmp_path), 8)
    tr, va, te = stratified_split(s, 0.2, seed=0, test_split=0.01)
    assert np.bincount(s.y[te], minlength=3).tolist() == [1, 0, 1]   # >= 3 images: at least one
    assert np.bincount(s.y[va], minlength=3).tolist() == [1, 1, 6]
    assert np.bincount(s.y[tr], minlength=3).tolist() == [1, 1, 23]


def test_load_splits_with_test_dir_and_with_test_split_0(image_folder, tmp_path):
    base = load_splits(str(image_folder), 32, 0.2, 1, test_split=0.0)
    assert base.test is None and base.report["n_test"] == 0 and base.report["test_per_class"] == {}
    test_dir = write_digit_folder(tmp_path / "test", per_class=4, seed=9)
    s = load_splits(str(image_folder), 32, 0.2, 1, test_split=0.1, test_dir=str(test_dir))
    # --test DIR replaces --test-split: train/val are the whole folder, split as without a test split
    assert s.train.paths == base.train.paths and s.val.paths == base.val.paths
    assert s.report["n_test"] == 12 and s.report["test_per_class"] == {"five": 4, "seven": 4, "six": 4}
    assert s.report["test_folder"] == str(test_dir)
    assert all(p.startswith(str(test_dir)) for p in s.test.paths)
    json.dumps(s.report)
    default = load_splits(str(image_folder), 32, 0.2, 1, test_split=0.1)
    assert default.report["n_test"] == 6 and default.report["test_per_class"] == {"five": 2, "seven": 2, "six": 2}
    assert default.report["n_train"] + default.report["n_val"] + default.report["n_test"] == 72
    assert _rows(default.test.x).isdisjoint(_rows(default.train.x) | _rows(default.val.x))
    with pytest.raises(UserError, match="--test .* is the training folder"):
        load_splits(str(image_folder), 32, 0.2, 1, test_dir=str(image_folder))


@pytest.mark.parametrize("values, message", [
    ({"test_split": 1.5}, r"--test-split must be in \[0, 1\)"), ({"test_split": -0.1}, "--test-split"),
    ({"test_split": 0.5, "val_split": 0.5}, "--test-split \\+ --val-split must be below 1"),
])
def test_bad_test_split_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_bad_test_split_on_the_command_line_exits_2(image_folder):
    r = run_cli("finetune", image_folder, "--weights", "none", "--test-split", "1.5")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("edgeft")]
    assert len(lines) == 1 and "--test-split must be in [0, 1), got 1.5" in lines[0], r.stderr


def test_an_old_config_yaml_keeps_its_train_val_split(image_folder, tmp_path):
    cfg = build_config({"folder": str(image_folder), **TINY})
    assert cfg.data.test_split == 0.1                       # a new run gets a test split
    old = yaml.safe_load(to_yaml(cfg))
    del old["data"]["test_split"], old["data"]["test_dir"]  # what edgeft wrote before it had them
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    read = from_yaml_file(path)
    assert read.data.test_split == 0.0 and read.data.test_dir is None
    splits = run_splits(read)
    assert splits.test is None and splits.report["n_test"] == 0
    full = scan_folder(str(image_folder), 32)
    old_tr, old_va = _old_stratified_split(full.y, 3, cfg.data.val_split, cfg.train.seed)
    assert splits.train.paths == [full.paths[i] for i in old_tr]
    assert splits.val.paths == [full.paths[i] for i in old_va]
    # a new run's config.yaml (with the key) reads back unchanged
    path.write_text(to_yaml(cfg))
    assert from_yaml_file(path) == cfg and run_splits(cfg).report["n_test"] == 6


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, image_folder, demo_weights):
    """A tiny run whose every training and validation input is recorded."""
    import edgeft
    from edgeft.train import stage1
    from edgeft.train import stages as training

    seen, evaluated = [], []
    real_dataset, real_eval = stage1.make_dataset, training.evaluate_arrays

    def dataset(images, *a, **k):
        seen.append(np.array(images.x))
        return real_dataset(images, *a, **k)

    def evaluate(model, images, *a, **k):
        evaluated.append(np.array(images.x))
        return real_eval(model, images, *a, **k)

    mp = pytest.MonkeyPatch()
    from edgeft.train import distribute

    mp.setattr(stage1, "make_dataset", dataset)         # stage 1's feature pass
    mp.setattr(distribute, "make_dataset", dataset)     # what fit() trains and validates on
    mp.setattr(training, "evaluate_arrays", evaluate)
    try:
        out = tmp_path_factory.mktemp("watched") / "run"
        result = edgeft.finetune({"folder": str(image_folder), "weights": demo_weights,
                                  **TINY, "head_epochs": 2, "finetune_epochs": 1}, out=out)
    finally:
        mp.undo()
    return result, seen, evaluated


def test_training_never_sees_the_test_split(watched_run):
    result, seen, evaluated = watched_run
    run = result.run_dir
    splits = run_splits(from_yaml_file(run / "config.yaml"))
    test_only = _rows(splits.test.x) - _rows(splits.train.x) - _rows(splits.val.x)
    assert len(test_only) == 6
    fed = set().union(*(_rows(x) for x in seen + evaluated))
    assert fed == _rows(splits.train.x) | _rows(splits.val.x)   # fit, early stopping, val metrics
    assert fed.isdisjoint(test_only)
    # the best epoch was chosen on the validation loss: the logged val_loss is the val split's
    m = result.metrics
    assert m["finetune"]["n"] == 12 and m["finetune"]["best_epoch"] == 1
    logged = [float(r["val_loss"]) for r in rundir.read_csv(run / "history.csv") if r["stage"] == "finetune"]
    assert abs(logged[0] - m["finetune"]["val_loss"]) < 1e-3
    assert rundir.read_json(run / "state.json")["best_val_loss"] == pytest.approx(logged[0])


def test_metrics_report_and_data_report_show_the_test_split(watched_run):
    from edgeft.verify.evaluate import test_accuracy_of_file
    from edgeft.core.stats import wilson_interval

    result, _, _ = watched_run
    run, t = result.run_dir, result.metrics["test"]
    assert t == rundir.read_json(run / "metrics.json")["test"]
    assert t["n"] == 6 and t["stage"] == "finetune" and t["per_class_n"] == {"five": 2, "seven": 2, "six": 2}
    assert t["accuracy"] == t["correct"] / 6
    assert t["interval_95"] == pytest.approx(list(wilson_interval(t["correct"], 6)), abs=1e-12)
    lo, hi = t["interval_95"]
    assert lo <= t["accuracy"] <= hi and hi - lo > 0.2          # 6 images: a wide interval
    row = next(ln for ln in (run / "report.md").read_text().splitlines() if ln.startswith("| finetune |"))
    assert f"{result.metrics['finetune']['val_accuracy']:.4f}" in row
    assert f"{t['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] of 6" in row
    assert NO_TEST_SPLIT not in (run / "report.md").read_text()
    dr = rundir.read_json(run / "data_report.json")
    assert (dr["n_train"], dr["n_val"], dr["n_test"]) == (54, 12, 6)
    assert dr["test_per_class"] == {"five": 2, "seven": 2, "six": 2}
    # the saved model file, run by its runtime, gives the same test result as training recorded
    splits = run_splits(from_yaml_file(run / "config.yaml"))
    f = test_accuracy_of_file(run / "model.keras", splits)
    assert f["correct"] == t["correct"] and f["n"] == 6
    splits.test = None
    assert test_accuracy_of_file(run / "model.keras", splits) is None


@pytest.mark.slow   # trains (the quick tier trains once, in quick_run)
def test_a_run_with_test_split_0_says_it_has_none(tmp_path, image_folder, demo_weights):
    from edgeft.pipeline.orchestrator import finetune

    r = finetune({"folder": str(image_folder), "weights": demo_weights, **TINY, "head_epochs": 1,
                  "finetune_epochs": 0, "test_split": 0}, out=tmp_path / "run")
    assert "test" not in r.metrics and "test" not in rundir.read_json(r.run_dir / "metrics.json")
    assert rundir.read_json(r.run_dir / "data_report.json")["n_test"] == 0
    assert r.metrics["head"]["n"] == 15          # the old validation split, 5 per class
    assert NO_TEST_SPLIT in (r.run_dir / "report.md").read_text()
