"""The parity gate's design: in-distribution inputs, intervals over source images, agreement on
clear inputs against the floor, and a cut-down version of tools/bench_gate.py's confusion table."""
from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import yaml

from conftest import REPO
from edgeft.core.config import EdgeftConfig, ParityConfig, build_config, from_yaml_file
from edgeft.core.errors import UserError
from edgeft.core.stats import group_bootstrap, paired_difference, points_per_image
from edgeft.core.tiers import Floor, judge
from edgeft.data.datasets import ImageSet, augment_copy, gate_inputs, parity_policy


def _bench_gate():
    spec = importlib.util.spec_from_file_location("bench_gate", REPO / "tools" / "bench_gate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- inputs
def _half_bright(size=32) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = 230
    return img


def _mirrored(img) -> bool:
    h = img.shape[1] // 2
    return img[:, h:].mean() > img[:, :h].mean()


def test_copies_are_mirrored_only_when_the_run_trained_with_mirroring():
    rng = np.random.default_rng(0)
    img = _half_bright()
    assert not any(_mirrored(augment_copy(img, rng, flip=False)) for _ in range(200))
    assert sum(_mirrored(augment_copy(img, rng, flip=True)) for _ in range(200)) > 50
    assert parity_policy(build_config({})) == "mild"
    assert parity_policy(build_config({"augment": True})) == "flip"
    assert parity_policy(build_config({"augment": True, "parity_augment": "mild"})) == "mild"
    val = ImageSet.from_arrays(["a", "b"], np.stack([img, img[:, ::-1]]), np.array([0, 1]))
    inputs = gate_inputs(val, build_config({"parity_inputs": 100}))
    assert inputs.policy == "mild" and len(inputs.y) == 100
    # a copy keeps its image's orientation: image 0 is bright on the left, image 1 on the right
    assert all(_mirrored(inputs.x[i]) == bool(inputs.source[i]) for i in range(100))
    alone = gate_inputs(val, build_config({"parity_inputs": 100, "parity_augment": "none"}))
    assert len(alone.y) == 2 and alone.policy == "none"


def test_bad_gate_settings_are_one_line_errors():
    for bad in ({"max_accuracy_drop": 0}, {"max_accuracy_drop": 100}, {"max_accuracy_drop": -1},
                {"max_accuracy_drop": "nan"}, {"floor_slack": -1}, {"clear_margin": 1.0}):
        with pytest.raises(UserError):
            build_config(bad)
    with pytest.raises(UserError, match="parity_augment"):
        build_config({"parity_augment": "sideways"})


def test_cli_refuses_a_bad_margin_and_an_unknown_augment_with_exit_2(exported_run):
    from conftest import run_cli

    run, _ = exported_run
    for flags in (("--max-accuracy-drop", "150"), ("--parity-augment", "sideways")):
        r = run_cli("parity", run, *flags)
        assert r.returncode == 2, (flags, r.stderr[-500:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


# ---------------------------------------------------------------- statistics over images
def test_intervals_resample_images_not_inputs():
    rng = np.random.default_rng(0)
    n_img, copies = 20, 50
    groups = np.repeat(np.arange(n_img), copies)
    per_image = rng.random(n_img) < 0.7          # each image right or wrong in all its copies
    ok = per_image[groups].astype(float)
    p, lo, hi = group_bootstrap(ok, np.ones_like(ok), groups)
    assert p == pytest.approx(per_image.mean())
    # 20 images, not 1,000 inputs: the interval is about as wide as 20 samples give (+-20 points)
    assert hi - lo > 0.25
    naive = 2 * 1.96 * np.sqrt(p * (1 - p) / len(ok))
    assert hi - lo > 3 * naive
    assert points_per_image(groups) == pytest.approx(5.0)
    d, dlo, dhi = paired_difference(ok, ok, groups)
    assert d == dlo == dhi == 0.0


def _clear_probs(n, k, rng):
    y = rng.integers(0, k, n)
    probs = np.full((n, k), 0.05 / (k - 1))
    probs[np.arange(n), y] = 0.95
    return probs, y


def test_judge_fails_another_model_at_the_same_accuracy_and_passes_near_tie_flips():
    rng = np.random.default_rng(1)
    n_img, copies, k = 60, 10, 3
    groups = np.repeat(np.arange(n_img), copies)
    src, y = _clear_probs(n_img * copies, k, rng)
    p = ParityConfig()
    # another model: wrong where the source is right on 8 % of the inputs, right where it is wrong on
    # as many: same accuracy, clear disagreements
    other = src.copy()
    idx = rng.choice(len(y), 80, replace=False)
    other[idx] = np.roll(other[idx], 1, axis=1)
    j = judge("int8", other, src, y, groups, p)
    assert not j.passed and any("clear inputs" in f for f in j.failures)
    assert len(j.real_disagreements) == 80 and j.near_tie_flips == []
    # a healthy int8 file: flips only on near-ties of the source model
    tie_src = src.copy()
    ties = rng.choice(len(y), 60, replace=False)
    tie_src[ties] = 1.0 / k
    tie_src[ties, y[ties]] += 0.02
    tie_src[ties] /= tie_src[ties].sum(1, keepdims=True)
    healthy = tie_src.copy()
    healthy[ties[:30]] = np.roll(healthy[ties[:30]], 1, axis=1)
    j = judge("int8", healthy, tie_src, y, groups, p)
    assert j.n_left_out == 60 and len(j.near_tie_flips) == 30 and j.real_disagreements == []
    assert not any("clear inputs" in f for f in j.failures)
    # a real accuracy loss fails on accuracy, and says so
    lossy = src.copy()
    lossy[:200] = np.roll(lossy[:200], 1, axis=1)
    j = judge("int8", lossy, src, y, groups, p)
    assert any(f.startswith("accuracy drop") for f in j.failures) and j.verdict.startswith("real accuracy loss")


def test_int8_agreement_threshold_follows_the_floor():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(50), 10)
    src, y = _clear_probs(500, 3, rng)
    file = src.copy()
    file[:15] = np.roll(file[:15], 1, axis=1)      # 97 % clear agreement
    p = ParityConfig(floor_slack=2.0, max_accuracy_drop=10.0)
    perfect = Floor("test", 100, 1.0, [1.0, 1.0], 100, 1.0, [1.0, 1.0])
    noisy = Floor("test", 100, 0.985, [0.97, 1.0], 100, 0.985, [0.97, 1.0])
    assert not judge("int8", file, src, y, groups, p, perfect).passed     # needs 98 %
    assert judge("int8", file, src, y, groups, p, noisy).passed           # needs 96.5 %


def test_too_few_images_is_said():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), 80)
    src, y = _clear_probs(len(groups), 3, rng)
    j = judge("int8", src, src, y, groups, ParityConfig())
    assert j.passed and any("too few images" in n and "--val DIR" in n for n in j.notes)


def test_a_criterion_on_too_few_inputs_is_not_judged_and_does_not_pass():
    """The vacuous pass: no clear input ("nan% of 0"), or a floor on no clear input, passed before."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40), 5)
    src, y = _clear_probs(len(groups), 3, rng)
    ties = np.full_like(src, 1 / 3)
    ties[np.arange(len(y)), y] += 0.01            # every input a near-tie: no clear input at all
    j = judge("int8", ties, ties, y, groups, ParityConfig())
    assert j.n_clear == 0
    assert not j.passed and j.verdict.startswith("not judged")
    assert any(f.startswith("not judged: top-1 agreement on 0 clear inputs") for f in j.failures)
    from edgeft.core.tiers import MIN_JUDGED

    # a floor measured on too few clear inputs of its own sets no threshold either
    thin = Floor("test", 60, 1.0, [1.0, 1.0], MIN_JUDGED - 1, 1.0, [1.0, 1.0])
    j = judge("int8", src, src, y, groups, ParityConfig(), thin)
    assert not j.passed and j.failures == [f"not judged: the floor on {MIN_JUDGED - 1} clear inputs "
                                           f"(fewer than {MIN_JUDGED})"]
    # a float file on fewer inputs than the gate needs
    few = judge("float", src[:MIN_JUDGED - 1], src[:MIN_JUDGED - 1], y[:MIN_JUDGED - 1], groups[:MIN_JUDGED - 1],
                ParityConfig())
    assert not few.passed and few.unjudged
    # --accept-unjudged: passes, marked
    j = judge("int8", ties, ties, y, groups, ParityConfig(accept_unjudged=True))
    assert j.passed and j.accepted_unjudged and j.verdict == "pass, NOT JUDGED (--accept-unjudged)"
    assert any(n.startswith("NOT JUDGED") for n in j.notes)
    # enough clear inputs, and a floor on enough: judged (the quick tier's 120 inputs / floor on 60)
    ok = Floor("test", 60, 1.0, [1.0, 1.0], MIN_JUDGED, 1.0, [1.0, 1.0])
    j = judge("int8", src, src, y, groups, ParityConfig(), ok)
    assert j.passed and not j.unjudged and not j.accepted_unjudged


def test_an_unjudged_file_goes_to_failed_unless_accepted_and_then_is_marked(quick_run, tmp_path, capsys):
    """The quick run's validation images alone (--parity-augment none: 12 inputs) cannot judge a file."""
    import json
    import shutil

    from edgeft.core.errors import ParityError
    from edgeft.pipeline.exporter import export

    result, _ = quick_run
    run = tmp_path / "run"
    shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns("export", ".export-*"))
    base = from_yaml_file(run / "config.yaml")
    cfg = build_config({"parity_augment": "none", "client_inputs": 0}, base=base)
    with pytest.raises(ParityError, match="not judged: outputs against Keras on 12 inputs"):
        export(run, tflite=["float"], cfg=cfg)
    assert (run / "export" / "failed" / "model_float.tflite").is_file()
    assert not (run / "export" / "model_float.tflite").exists()
    assert "model_float.tflite" not in json.loads((run / "export" / "manifest.json").read_text())["files"]
    capsys.readouterr()
    report = export(run, tflite=["float"], cfg=build_config({"accept_unjudged": True}, base=cfg))
    out = capsys.readouterr().out
    row = report["rows"][0]
    assert row["passed"] and row["accepted_unjudged"] and row["unjudged"]
    assert "model_float.tflite (litert) ships NOT JUDGED (--accept-unjudged)" in out
    assert "NOT JUDGED" in (run / "export" / "parity.md").read_text()
    entry = json.loads((run / "export" / "manifest.json").read_text())["files"]["model_float.tflite"]
    assert entry["judged"] is False and entry["parity"][0]["not_judged"] == row["unjudged"]


# ---------------------------------------------------------------- old configs and exports
def test_old_parity_keys_are_mapped_when_an_old_config_is_read(tmp_path):
    old = {"data": {"folder": "x"}, "parity": {"int8_agreement": 0.98, "int8_max_drop": 0.02,
                                               "int8_qat_max_drop": 0.02, "parity_flip": False,
                                               "parity_inputs": 500}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = from_yaml_file(path)
    assert cfg.parity.parity_augment == "mild" and cfg.parity.max_accuracy_drop == pytest.approx(2.0)
    assert cfg.parity.parity_inputs == 500
    old["parity"]["parity_flip"] = True
    path.write_text(yaml.safe_dump(old))
    assert from_yaml_file(path).parity.parity_augment == "auto"
    assert EdgeftConfig().parity.parity_augment == "auto"


@pytest.mark.slow
def test_parity_rejudges_an_old_export_by_the_new_gate(exported_run, tmp_path):
    """An export made before this gate (old keys in config.yaml) is judged again by `edgeft parity`."""
    from edgeft.verify.parity import check_parity

    run, _ = exported_run
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["parity"] = {k: v for k, v in cfg["parity"].items()
                     if k not in ("max_accuracy_drop", "clear_margin", "floor_slack", "floor_inputs", "parity_augment")}
    cfg["parity"] |= {"int8_agreement": 0.98, "int8_max_drop": 0.02, "int8_qat_max_drop": 0.02, "parity_flip": True,
                      "client_inputs": 0}
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = check_parity(copy)
    assert report["passed"] and report["augment"] == "mild"
    assert {r["format"] for r in report["rows"]} >= {"tflite_int8", "onnx_int8"}


# ---------------------------------------------------------------- the gate on real files
def test_export_reports_floors_from_a_second_implementation(exported_run):
    """int8 rows carry a floor measured now, by LiteRT's reference kernels or ONNX Runtime without fusions."""
    _, report = exported_run
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["tflite_int8"]["floor"]["how"] == "LiteRT reference kernels"
    assert rows["onnx_int8"]["floor"]["how"].startswith("ONNX Runtime without graph fusions")
    for name in ("tflite_int8", "onnx_int8"):
        f = rows[name]["floor"]
        assert f["n"] >= 50 and 0.9 <= f["agreement"] <= 1.0
        assert rows[name]["passed"], rows[name]["failures"]
        assert rows[name]["n_images"] == report["n_validation_images"]
    assert report["passed"], report["remedies"]


def test_onnx_without_fusions_is_a_different_implementation(exported_run):
    """The ONNX floor is only a floor if the unfused graph really computes differently."""
    from edgeft.core.floor import second_implementation
    from edgeft.nn.runtime import open_runner

    run, _ = exported_run
    path = run / "export" / "model_int8.onnx"
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    fused = open_runner(path).predict(x)
    plain = np.stack([second_implementation(path).predict_one(img) for img in x])
    assert np.abs(fused - plain).max() > 0


@pytest.mark.slow
def test_cut_down_confusion_table(exported_run, trained_run):
    """Healthy PTQ int8 passes; files broken the way such bugs happen fail, each for its reason."""
    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.data.datasets import representative_images
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.run import Run

    bg = _bench_gate()
    run = Run.open(exported_run[0])
    cfg, model = run.cfg, run.model
    inputs = gate_inputs(run.splits.val, cfg)
    rep = representative_images(run.splits.train, 60, cfg.train.seed)
    ref = keras_probs(model, inputs.x)
    good = tflite_int8(model, rep)
    cases = {"healthy": good, "normalization": bg.int8_bytes(bg.wrapped(model, lambda t: t / 255.0), rep),
             "input-scale-2x": bg.scaled_input(good, 2.0), "hand-edited": bg.hand_edited(good),
             "truncated": good[: len(good) // 2]}
    results = {name: bg.judge_file(name, data, ".tflite", inputs, ref, cfg, "x", "ptq") for name, data in cases.items()}
    assert results["healthy"]["passed"], results["healthy"]
    for name in ("normalization", "input-scale-2x", "hand-edited", "truncated"):
        assert not results[name]["passed"], results[name]
    assert "refused" in results["truncated"]


# ---------------------------------------------------------------- the cost of the floor and of TFLite Micro
def test_the_floor_stops_once_its_interval_is_narrower_than_the_slack(monkeypatch):
    """A second implementation that agrees everywhere: 50 inputs settle it (300 without a slack);
    one that disagrees on clear inputs keeps sampling to the end."""
    from edgeft.core import floor as floor_mod

    rng = np.random.default_rng(5)
    n = 600
    groups = np.repeat(np.arange(60), 10)
    src, y = _clear_probs(n, 3, rng)
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)    # each input names its own index

    class Same:
        how = "fake"

        def __init__(self, flip=()):
            self.flip = set(flip)

        def predict_one(self, img):
            i = int(img[0, 0, 0])
            return np.roll(src[i], 1) if i in self.flip else src[i]

    monkeypatch.setattr(floor_mod, "second_implementation", lambda path: Same())
    quick = floor_mod.measure_floor("f.tflite", x, src, src, groups, 0.25, 300, 0, slack=1.0)
    full = floor_mod.measure_floor("f.tflite", x, src, src, groups, 0.25, 300, 0)
    assert quick.n == floor_mod.MIN_INPUTS and full.n == 300
    assert quick.clear_interval == full.clear_interval == [1.0, 1.0]
    idx, out = quick.reference
    assert np.allclose(out, src[idx])   # float32 copies
    monkeypatch.setattr(floor_mod, "second_implementation", lambda path: Same(flip=range(0, n, 7)))
    noisy = floor_mod.measure_floor("f.tflite", x, src, src, groups, 0.25, 300, 0, slack=1.0)
    assert noisy.n == 300 and noisy.clear_interval[1] - noisy.clear_interval[0] >= 0.01


def test_tflm_is_checked_identical_to_litert_reference_kernels(quick_run, monkeypatch):
    from edgeft.core.floor import measure_floor
    from edgeft.core.tiers import MIN_JUDGED
    from edgeft.export import tflm as tflm_mod
    from edgeft.nn.runtime import open_runner
    from edgeft.verify.parity import tflm_identity

    result, _ = quick_run
    path = result.run_dir / "export" / "model_int8.tflite"
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (MIN_JUDGED + 20, 32, 32, 3)).astype(np.float32)
    probs = open_runner(path).predict(x)
    floor = measure_floor(path, x, probs, probs, np.arange(len(x)), 0.0, len(x), 0)
    fails, note = tflm_identity(path, x, floor, 0)
    assert fails == [] and f"identical to LiteRT's reference kernels on {MIN_JUDGED} of {MIN_JUDGED}" in note
    real = tflm_mod.TFLMRunner.predict_one
    monkeypatch.setattr(tflm_mod.TFLMRunner, "predict_one", lambda self, img: real(self, img) * 0.99)
    fails, _ = tflm_identity(path, x, floor, 0)
    assert len(fails) == 1 and fails[0].startswith("TensorFlow Lite Micro's outputs differ")


def test_the_tflm_row_takes_its_identity_check_from_the_client_matrix_cells():
    """Issue 26 item 6: with the client matrix running, TFLite Micro runs once per export (the matrix's
    cell); the gate's TFLM row compares that cell with the matrix's LiteRT reference-kernel cell on
    the same first inputs. A difference fails the row; too few inputs or a failed cell: the gate runs
    the check itself (None)."""
    from pathlib import Path

    from edgeft.core.tiers import MIN_JUDGED
    from edgeft.verify.clients import ClientOutput
    from edgeft.verify.parity import matrix_tflm_identity

    rng = np.random.default_rng(0)
    ref = rng.random((MIN_JUDGED + 10, 4)).astype(np.float32)

    class Cells:
        def __init__(self, tflm, litert_ref):
            self.cells = {"tflm": tflm, "litert_ref": litert_ref}

        def cell(self, name, client):
            out = self.cells.get(client)
            return None if out is None else ({"file": name, "client": client},
                                             None if isinstance(out, str) else ClientOutput(out, out.argmax(-1)))

    path = Path("model_int8.tflite")
    fails, note = matrix_tflm_identity(Cells(ref[:MIN_JUDGED].copy(), ref), path)
    assert fails == [] and f"on {MIN_JUDGED} of {MIN_JUDGED} inputs (the client matrix's cells)" in note
    off = ref[:MIN_JUDGED].copy()
    off[3] += 1e-6
    fails, _ = matrix_tflm_identity(Cells(off, ref), path)
    assert len(fails) == 1 and fails[0].startswith(f"TensorFlow Lite Micro's outputs differ from LiteRT's reference "
                                                   f"kernels on 1 of {MIN_JUDGED}")
    assert fails[0].code == "tflm_differs"   # a failure with its code, like the gate's own (issue 30)
    assert matrix_tflm_identity(Cells(ref[:MIN_JUDGED - 1].copy(), ref), path) is None   # too few: not from the matrix
    assert matrix_tflm_identity(Cells("load: failed", ref), path) is None                # failed cell: the gate runs it
    assert matrix_tflm_identity(Cells(None, ref), path) is None                          # no such cell
