"""The pictures a run and a search leave (issue 29 item 8), checked on the data behind them: each
figure is caught as it is saved (matplotlib's Figure.savefig), so the test reads its titles, marks,
scales and error bars, and the gallery's sidecar JSON is checked against predictions made here."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from matplotlib.figure import Figure


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved while the test runs, by the file name it was saved for (the temporary
    file of an atomic write is named after it: .NAME.XXXX.png)."""
    figs = {}
    original = Figure.savefig

    def catch(self, fname, *a, **k):
        name = str(fname).rsplit("/", 1)[-1]
        figs[name[1:].split(".png")[0] + ".png" if name.startswith(".") else name] = self
        return original(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", catch)
    return figs


def _row(cid, lat, kb, **kw):
    from edgeft.search.report import COLUMNS

    r = dict.fromkeys(COLUMNS) | {"id": cid, "latency_p95_ms": lat, "size_kb": kb, "stopped_why": "", "chosen": False,
                                  "latency_measured": "host: Linux (2 CPUs), litert 1.2"}
    return r | kw


def _by_gid(ax, prefix):
    return [a for a in ax.get_children() if str(a.get_gid() or "").startswith(prefix)]


def test_pareto_reads_at_any_scale_draws_every_limit_and_intervals(tmp_path, saved):
    """expected: 0.035 and 0.074 ms apart on a log axis under a 20 ms limit; size, arena, RAM and accuracy
    limits drawn; the shipped file's interval (and stage accuracies' Wilson interval) as error bars;
    the latency's source named; the y label inside the picture"""
    from edgeft.core.stats import wilson_interval
    from edgeft.search.report import pareto_png
    from edgeft.search.space import Limits

    table = [_row("a", 0.035, 480.0, shipped_val_accuracy=0.91, shipped_val_low=0.86, shipped_val_high=0.94,
                  chosen=True, arena_kb=90.0, ram_mb=3.0),
             _row("b", 0.074, 820.0, stage1_val_accuracy=0.85, stage2_val_accuracy=0.9, val_n=180, arena_kb=120.0,
                  ram_mb=5.0),
             _row("c", 35.0, 58000.0, stopped_why="phase 1: breaks p95 latency", arena_kb=900.0, ram_mb=60.0)]
    limits = Limits(latency_ms=20, size_kb=2000, arena_kb=256, ram_mb=32, min_accuracy=0.8)
    assert pareto_png(tmp_path / "pareto.png", table, limits)
    fig = saved["pareto.png"]
    lat_ax = fig.axes[0]
    assert lat_ax.get_xscale() == "log"
    pts = np.concatenate([c.get_offsets() for c in _by_gid(lat_ax, "candidates")])
    px = lat_ax.transData.transform(pts)[:, 0]
    assert sorted(pts[:, 0]) == [0.035, 0.074] and abs(px[1] - px[0]) > 20   # apart, not both at x = 0
    lo, hi = lat_ax.get_xlim()
    assert lo < 0.035 and hi > 35.0                                  # every candidate and the limit in view
    limit_x = {a.get_gid(): a.get_xdata()[0] for ax in fig.axes for a in _by_gid(ax, "limit:--max")}
    assert limit_x == {"limit:--max-latency-ms": 20, "limit:--max-size-kb": 2000, "limit:--max-arena-kb": 256,
                       "limit:--max-ram-mb": 32}
    assert all(a.get_ydata()[0] == 0.8 for ax in fig.axes for a in _by_gid(ax, "limit:--min-accuracy"))
    assert len([a for ax in fig.axes for a in _by_gid(ax, "limit:--min-accuracy")]) == len(fig.axes) == 4
    bars = sorted(tuple(np.round(seg[:, 1], 6)) for c in _by_gid(lat_ax, "intervals") for seg in c.get_segments())
    s_lo, s_hi = wilson_interval(round(0.9 * 180), 180)
    assert bars == sorted([(0.86, 0.94), (round(s_lo, 6), round(s_hi, 6))])
    assert len(_by_gid(lat_ax, "untrained")) == 1                    # "c": never trained, still shown
    assert "this host" in lat_ax.get_xlabel() and "device" in lat_ax.get_xlabel()
    fig.canvas.draw()
    box, inside = lat_ax.yaxis.label.get_window_extent(), fig.bbox
    assert box.y0 >= inside.y0 and box.y1 <= inside.y1 and box.x0 >= inside.x0   # y label not clipped


def test_pareto_plots_the_device_times_a_device_timed_search_judged(tmp_path, saved):
    """expected: a search timed on the device plots the device's latency, not the trained file's host time"""
    from edgeft.search.report import pareto_png
    from edgeft.search.space import Limits

    row = _row("a", 2.5, 500.0, latency_measured="device: Linux aarch64 (4 CPUs), litert 1.2",
               trained_latency_p95_ms=0.04, trained_latency_measured="host: Linux (2 CPUs), litert 1.2",
               trained_size_kb=510.0, shipped_val_accuracy=0.9, shipped_val_low=0.8, shipped_val_high=0.95)
    assert pareto_png(tmp_path / "pareto.png", [row], Limits(latency_ms=20))
    ax = saved["pareto.png"].axes[0]
    assert [tuple(p) for c in _by_gid(ax, "candidates") for p in c.get_offsets()] == [(2.5, 0.9)]
    assert "on the device" in ax.get_xlabel() and "host" not in ax.get_xlabel()


def test_mistakes_most_confident_first_and_at_most_the_limit():
    """expected: every wrong prediction counted, the most confident first, at most `limit` listed"""
    from edgeft.train.pictures import mistakes

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y = np.array([0, 0, 0, 1, 1])
    found = mistakes(probs, y, [f"p{i}" for i in range(5)], ["a", "b"], limit=2)
    assert found["n"] == 5 and found["wrong"] == 3
    assert [(i["path"], i["true"], i["predicted"], i["confidence"]) for i in found["images"]] == \
        [("p1", "a", "b", 0.8), ("p2", "a", "b", 0.7)]


@pytest.fixture(scope="module")
def opened(quick_run):
    """The quick run: its directory, Run handle, model.keras loaded once, splits."""
    import edgeft

    run = quick_run[0].run_dir
    handle = edgeft.Run.open(run)
    return run, handle, edgeft.load_model(handle.model_path), handle.splits


def _reports_again(opened, out, splits=None):
    """write_reports of the quick run into a fresh directory `out` (its history, metrics, model, splits)."""
    from edgeft.train.report import write_reports

    run, handle, model, run_splits = opened
    out.mkdir()
    shutil.copy(run / "history.csv", out / "history.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    write_reports(out, model, splits or run_splits, metrics, handle.cfg)
    return run, out, metrics


def test_run_pictures_mark_stages_restored_epoch_and_name_the_split(opened, tmp_path, saved):
    """expected: curves.png's marks at the recorded stage boundaries and the restored (best) epoch;
    confusion_matrix.png titled with its split and n, counts and row-normalised panels"""
    from edgeft.core import rundir

    run, out, metrics = _reports_again(opened, tmp_path / "run")
    rows = rundir.read_csv(run / "history.csv")
    n = {s: sum(r["stage"] == s for r in rows) for s in ("head", "finetune", "qat")}
    assert all(n.values()), n
    curves = saved["curves.png"]
    for ax in curves.axes:
        assert sorted(a.get_xdata()[0] for a in _by_gid(ax, "stage-boundary")) == \
            [n["head"] + 0.5, n["head"] + n["finetune"] + 0.5]
        best = metrics["finetune"]["best_epoch"]
        want = n["head"] if metrics["finetune"].get("kept_stage1") else n["head"] + best
        assert [a.get_xdata()[0] for a in _by_gid(ax, "restored-epoch")] == [want]
        assert best == json.loads((run / "state.json").read_text())["best_epoch"]
    cm_fig = saved["confusion_matrix.png"]
    test = metrics["qat"]["test"]                     # the final stage (QAT), on the test split
    assert cm_fig._suptitle.get_text() == f"QAT model: test split, n = {test['n']}"
    counts, norm = (ax.images[0].get_array() for ax in cm_fig.axes[:2])
    assert np.array_equal(counts, test["confusion_matrix"]) and counts.sum() == test["n"]
    assert np.allclose(np.asarray(norm).sum(axis=1), 1.0)
    assert np.allclose(norm, np.asarray(test["confusion_matrix"]) / np.sum(test["confusion_matrix"], 1, keepdims=True))
    # the gallery shows exactly the images mistakes.json lists, each titled with its classes and confidence
    listed = json.loads((out / "mistakes.json").read_text())["images"]
    shown = [ax for ax in saved["mistakes.png"].axes if ax.images]
    assert [ax.get_title() for ax in shown] == [f"true {i['true']}\npred {i['predicted']} {i['confidence']:.2f}"
                                                 for i in listed]


def _check_mistakes(record: dict, images, probs, classes, split: str) -> None:
    """`record` (a mistakes.json) lists exactly the images of `images` that `probs` gets wrong, the
    most confident first, with true and predicted class and confidence."""
    pred = probs.argmax(-1)
    wrong = sorted(np.flatnonzero(pred != images.y), key=lambda i: (-probs[i, pred[i]], images.paths[i]))[:24]
    assert (record["split"], record["n"], record["wrong"]) == (split, len(images.y), int((pred != images.y).sum()))
    assert [(i["path"], i["true"], i["predicted"]) for i in record["images"]] == \
        [(images.paths[i], classes[images.y[i]], classes[pred[i]]) for i in wrong]
    assert np.allclose([i["confidence"] for i in record["images"]], [probs[i, pred[i]] for i in wrong], atol=1e-5)


def test_mistakes_json_lists_exactly_the_wrong_images(opened, tmp_path):
    """expected: the run's mistakes.json lists exactly the test images model.keras gets wrong (recomputed
    here with Keras); a run without test images lists the validation images it gets wrong, so labelled"""
    import dataclasses

    run, _, model, splits = opened
    probs = model.predict(splits.test.x.astype(np.float32), verbose=0)
    _check_mistakes(json.loads((run / "mistakes.json").read_text()), splits.test, probs, splits.classes, "test")
    assert "mistakes.png" in (run / "report.md").read_text()
    # the same run as if it had no test split: the validation images, labelled as tuned on
    _, out, _ = _reports_again(opened, tmp_path / "no-test", dataclasses.replace(splits, test=None))
    record = json.loads((out / "mistakes.json").read_text())
    probs = model.predict(splits.val.x.astype(np.float32), verbose=0)
    _check_mistakes(record, splits.val, probs, splits.classes, "val (tuned on)")
    assert record["wrong"] >= 1, "the quick run's model gets every validation image right: this list checks nothing"


def test_evaluate_names_folder_and_n_and_lists_its_mistakes(quick_run, image_folder, tmp_path, saved):
    """expected: `edgeft evaluate`'s confusion matrix names the folder and n; its mistakes.json lists
    exactly the images the file gets wrong (recomputed here by the file's runtime)"""
    from edgeft.data.datasets import scan_folder
    from edgeft.nn.runtime import open_runner
    from edgeft.verify.evaluate import evaluate

    model = quick_run[0].run_dir / "export" / "model_int8.tflite"
    r = evaluate(model, image_folder, out=tmp_path / "eval", include_trained=True)   # all the folder, as recomputed below
    assert saved["confusion_matrix.png"]._suptitle.get_text() == \
        f"model_int8.tflite: folder {image_folder.name}/, n = {r['n']}, accuracy {r['accuracy']:.3f}"
    images = scan_folder(str(image_folder), 32, classes=r["labels"])
    probs = open_runner(model).predict(images.x.astype(np.float32))
    pred = probs.argmax(-1)
    wrong = sorted(np.flatnonzero(pred != images.y), key=lambda i: (-probs[i, pred[i]], images.paths[i]))[:24]
    record = json.loads((tmp_path / "eval" / "mistakes.json").read_text())
    assert record["wrong"] == int((pred != images.y).sum()) == round((1 - r["accuracy"]) * r["n"])
    assert [i["path"] for i in record["images"]] == [images.paths[i] for i in wrong]
