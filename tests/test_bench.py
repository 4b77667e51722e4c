"""`edgeft benchmark`: every format measured in one process, ratios, and the accuracy flag."""
from edgeft.core import rundir
from edgeft.core.formats import FORMATS
from edgeft.verify.bench import benchmark


def test_benchmark_measures_every_format(exported_run, image_folder):
    run, _ = exported_run
    result = benchmark(run, data=str(image_folder), threads=(1, 2), runs=5, warmup=1)
    rows = {r["format"]: r for r in result["rows"]}
    assert set(rows) == {"keras"} | {f.name for f in FORMATS if f.family != "tflm" and f.default}
    assert result["n_images"] == 72
    for name, r in rows.items():
        assert r["size_bytes"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        for timed in ("invoke_ms", "end_to_end_ms"):   # the device script's two latencies, by their names
            for key, lat in r[timed].items():
                assert 0 < lat["p50"] <= lat["p90"] and lat["mean"] > 0, (name, timed, key)
            if name != "keras":
                assert set(r[timed]) == {"1", "2"}
    assert rows["tflite_float"]["size_ratio_vs_tflite_float"] == 1.0
    assert rows["tflite_int8"]["size_ratio_vs_tflite_float"] < 0.5
    assert rows["tflite_float"]["invoke_p50_ratio_vs_tflite_float"] == {"1": 1.0, "2": 1.0}
    assert not any(r["flagged"] for r in rows.values())       # all within 2 points on this set
    saved = rundir.read_json(run / "benchmark.json")
    assert saved["rows"][0]["format"] == "keras"
    assert "tflite_int8" in (run / "benchmark.md").read_text()


def test_benchmark_flags_formats_below_the_floor(exported_run):
    run, _ = exported_run
    # a floor above the Keras accuracy itself: every format must be flagged
    result = benchmark(run, threads=(1,), runs=3, warmup=1, max_drop=-0.5)
    assert all(r["flagged"] for r in result["rows"])
    assert "BELOW FLOOR" in (run / "benchmark.md").read_text()
