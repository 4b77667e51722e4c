"""Issue 30 item 1: formats as data. Builders register by a format's name, gate tiers are rows that
judge, the gate's bound and the golden vectors all read, a gate failure carries a code; adding a
format is a row, a builder and (for a new tier) a tier row (docs/export.md, "Adding a format")."""
from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import fields

import numpy as np
import pytest

from edgeft.core.config import ParityConfig, build_config, from_yaml_file


def test_every_format_is_built_by_the_builder_registered_under_its_name():
    import edgeft.pipeline.exporter as exporter
    from edgeft.core.formats import FORMATS, Format
    from edgeft.export.builders import BUILDERS

    assert set(BUILDERS) == {f.name for f in FORMATS}
    assert "builder" not in {f.name for f in fields(Format)}     # no function named by a string
    source = inspect.getsource(exporter)
    assert "globals()" not in source and "model_int8.tflite" not in source
    assert BUILDERS["tflite_int8"].uses_int8_choice and BUILDERS["tflm_int8"].after_write is not None


def test_a_failure_is_decided_by_its_code_not_its_text():
    from edgeft.core.tiers import Failure, judge, describe

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 5)
    y = rng.integers(0, 3, len(groups))
    src = np.full((len(y), 3), 0.05)
    src[np.arange(len(y)), y] = 0.9
    lossy = src.copy()
    lossy[:100] = np.roll(lossy[:100], 1, axis=1)
    j = judge("int8", lossy, src, y, groups, ParityConfig())
    assert {f.code for f in j.failures} == {"accuracy_drop", "agreement"}
    assert json.loads(json.dumps(j.as_dict()))["failures"] == [str(f) for f in j.failures]   # JSON keeps the text
    # the verdict follows the code whatever the wording
    j.failures = [Failure("accuracy_drop", "lost 9 points against its source")]
    assert describe(j).startswith("real accuracy loss")
    j.failures = [Failure("agreement", "accuracy drop is not what failed here")]
    assert describe(j).startswith("disagrees with its source model")
    j.failures = [Failure("input_contract", "input scale 0.5")]
    assert describe(j).startswith("breaks the input contract")


def test_a_tier_row_is_what_judge_the_gate_bound_and_the_golden_vectors_read(monkeypatch):
    from edgeft.core import tiers
    from edgeft.export.golden import tier_rule

    row = tiers.Tier("int16x8", atol="fp16_atol", agreement="dynamic_agreement", accuracy_drop=True,
                     input_contract=False, golden_atol=0.05, golden_top1=True)
    monkeypatch.setitem(tiers.TIERS, "int16x8", row)
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(50), 4)
    y = rng.integers(0, 3, len(groups))
    src = np.full((len(y), 3), 0.05)
    src[np.arange(len(y)), y] = 0.9
    p = ParityConfig(dynamic_agreement=0.9)
    j = tiers.judge("int16x8", src, src, y, groups, p)
    assert j.passed and j.required_clear_agreement == 0.9           # its agreement field, read by name
    assert [f.code for f in tiers.bound_failures("int16x8", src + 0.03, src, p)] == ["max_diff"]   # fp16_atol 0.02
    assert tier_rule("int16x8") == {"tier": "int16x8", "max_abs_diff": 0.05, "top1_must_match": True}


def test_a_new_format_is_a_row_a_builder_and_a_tier(quick_run, tmp_path, monkeypatch):
    """docs/export.md's "Adding a format" (16x8 was added so: tests/test_int16x8.py), for a made-up
    format: three registrations and nothing else, and export, the gate, the golden vectors, the
    manifest, --tflite and the search targets all take it. The builder returns the float file's bytes."""
    import edgeft.core.formats as formats
    import edgeft.pipeline.exporter as exporter
    import edgeft.pipeline.staging as staging
    from edgeft.core import tiers
    from edgeft.export import builders
    from edgeft.search.space import targets

    result, _ = quick_run
    float_bytes = (result.run_dir / "export" / "model_float.tflite").read_bytes()
    # 1. edgeft/core/formats.py: the row
    row = formats.Format("tflite_example", "tflite", "example", "model_example.tflite", "example", "litert",
                         search=True)
    table = formats.FORMATS + (row,)
    for module in (formats, exporter, staging):
        monkeypatch.setattr(module, "FORMATS", table)
    # 2. edgeft/export/builders.py: the builder, registered under the row's name
    monkeypatch.setattr(builders, "BUILDERS", dict(builders.BUILDERS))
    monkeypatch.setattr(exporter, "BUILDERS", builders.BUILDERS)

    @builders.builds("tflite_example")
    def tflite_example(ctx, fmt):
        ctx.made_from[fmt.name] = "ptq"
        return float_bytes
    # 3. edgeft/core/tiers.py: its tier (only because no existing tier fits)
    monkeypatch.setitem(tiers.TIERS, "example", tiers.Tier(
        "example", atol="dynamic_atol", agreement="fp16_agreement", accuracy_drop=True, input_contract=False,
        golden_atol=0.05, golden_top1=True))

    assert [f.name for f in formats.select_formats(["example"], None)] == ["tflite_example"]
    assert "tflite-example" in targets(table)
    run = tmp_path / "run"
    shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns("export", ".export-*", ".lock*"))
    cfg = build_config({"client_inputs": 0}, base=from_yaml_file(run / "config.yaml"))
    report = exporter.export(run, tflite=["example"], cfg=cfg)
    [gated] = report["rows"]
    assert (gated["format"], gated["tier"], gated["passed"]) == ("tflite_example", "example", True)
    assert gated["required_clear_agreement"] == cfg.parity.fp16_agreement
    out = run / "export"
    assert (out / "model_example.tflite").read_bytes() == float_bytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model_example.tflite"}
    golden = json.loads((out / "golden" / "expected.json").read_text())
    assert golden["files"]["model_example.tflite"]["max_abs_diff"] == 0.05


@pytest.mark.parametrize("family", ["tflite", "onnx"])
def test_export_help_lists_the_table_flags(family, capsys):
    from edgeft.cli.app import main
    from edgeft.core.formats import flags_of

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{', '.join(flags_of(family))} or all" in text
