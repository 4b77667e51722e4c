#!/usr/bin/env python
"""Runs every hostile-input / fault test and prints, round by round, a table: case, what edgeft
promises and what was observed (pass, FAIL with the first line of the failure, or skipped with the
reason), then the same as JSON.

Round 1 is every test marked `@pytest.mark.faults` (its "expected: ..." docstring is the promise)
that round 2 does not list. Round 2 is issue 28's cases, each named as the issue names it, with its
promise and the tests that check it (ROUND2 below; a property case of tests/integrity_cases.py is
`integrity:NAME`): observed is "pass" when every one of them passed, the first failure otherwise,
and "no test collected" for a case whose tests are not here (or whose files were not given).

    python tools/bench_faults.py                      # every faults test and round 2 test under tests/
    python tools/bench_faults.py -k lock --json faults.json
    python tools/bench_faults.py -- -x                # anything after -- goes to pytest

The next round of hostile testing starts from this list: add a case as a test marked
`@pytest.mark.faults` whose docstring begins "expected: ...". Exit status: 0 when every case held,
1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from pytest import hookimpl as pytest_hookimpl

REPO = Path(__file__).resolve().parent.parent
INTEGRITY = "tests/test_integrity.py::test_every_refusal_is_cheap_and_changes_nothing"
H2, H2B, SC = "tests/test_hostile2.py::", "tests/test_hostile2b.py::", "tests/test_search_checks.py::"

# Issue 28 (hostile input, round 2): (case, expected, tests). A test is a pytest node id, a node id
# prefix ending in "::" (every test of the file) or "integrity:CASE" (a property case: exit 2, one
# line, before TensorFlow, nothing changed, under 3 s).
ROUND2: list[tuple[str, str, list[str]]] = [
    ("--latency-from with null / NaN / negative / text latencies, no machine, empty or malformed JSON",
     "exit 2 with one line naming the entry and the field; no limit is passed by a number that is not one",
     ["integrity:latency_from_nan_p95", "integrity:latency_from_negative_p50", "integrity:latency_from_text_p95",
      "integrity:latency_from_without_machine", "integrity:latency_from_empty_results",
      "integrity:latency_from_files_as_strings"]),
    ("the search's untrained file 3 % larger than the shipped one (--max-size-kb dropped a fitting candidate)",
     "phase 1 measures the file as it ships (starting weights, export's converter path and metadata): the same "
     "bytes count; a size within 3 % over the limit is trained and judged on its shipped file",
     [SC + "test_phase1_judges_the_size_of_the_file_that_ships", SC + "test_phase1_drops_for_size_only_past_the_slack"]),
    ("16-bit images scaled per image",
     "scaled by the format's bit depth (PNG sBIT honoured), decoder version bumped, verify names the older decoder",
     [H2 + "test_16_bit_images_are_scaled_by_their_bit_depth_not_per_image", H2 + "test_png_sbit_is_honoured",
      H2 + "test_a_decoder_version_bump_rebuilds_the_cache",
      H2 + "test_verify_says_when_golden_vectors_come_from_the_older_decoder"]),
    ("two predict paths order ties differently; two timers claim the same statistic",
     "one predict path and one timer (the device file's): ties ranked alike, invoke and end-to-end named apart",
     ["tests/test_predict.py::test_tied_scores_are_ranked_alike_by_both_predict_paths",
      "tests/test_predict.py::test_the_device_timer_times_invoke_and_end_to_end_apart"]),
    ("class or file names that are not UTF-8", "one line (a class name) or read like any other (a file name)",
     ["integrity:class_name_not_utf8", H2 + "test_a_file_name_that_is_not_utf8_is_read"]),
    ("--storage garbage://x, --storage naming a text file", "exit 2 before phase 1; never writes into that file",
     ["integrity:search_storage_unknown_url", "integrity:search_storage_is_a_text_file"]),
    ("--out . with --overwrite", "one line naming the working directory", ["integrity:overwrite_the_working_directory"]),
    ("--seed -1, a seed past 2**32-1", "exit 2, the range named", ["integrity:seed_negative", "integrity:seed_past_32_bits"]),
    ("a --config that is binary, nested 100,000 deep, a directory",
     "one line each (not UTF-8 / nests deeper / is a directory)",
     ["integrity:config_binary", "integrity:config_nested_100000_deep", "integrity:config_is_a_directory"]),
    ("a search.json edited by hand", "one line naming the file and what is wrong",
     ["integrity:search_json_edited_by_hand", "integrity:search_json_unknown_limit"]),
    ("--parity-inputs 100000000 (1.12 TiB), 1000000 (12 GB)", "refused before work, the bound or the estimate quoted",
     ["integrity:parity_inputs_unbounded", "integrity:parity_inputs_past_free_memory"]),
    ("tf2onnx's tracebacks printed before edgeft's line (--opset 1)", "--opset refused before TensorFlow; "
     "a failed conversion is one line", [H2B + "test_a_failed_onnx_conversion_is_one_line_without_tf2onnx_tracebacks",
                                         "integrity:export_opset_past_tf2onnx"]),
    ("device.py validating with assert (gone under python -O)", "no assert statement in the device file",
     [H2 + "test_the_device_file_validates_without_assert"]),
    ("a 414-byte YAML billion laughs; an error quoting a value whole",
     "anchors and aliases refused, nothing expanded; a quoted value capped at 200 characters",
     ["integrity:config_billion_laughs", "integrity:config_value_quoted_whole"]),
    ("--augment-views 100000 (22.5 GB scratch)", "refused before work, the bound named",
     ["integrity:augment_views_unbounded"]),
    ("--workers 48 for 2 trials; workers outliving a killed coordinator",
     "at most one worker per core; a worker dies with its coordinator",
     ["integrity:search_workers_unbounded", SC + "test_a_worker_dies_with_its_coordinator"]),
    ("search --lr-head nan leaves a search.json behind", "exit 2 before anything is written",
     ["integrity:search_lr_head_nan"]),
    ("--resume silently ignores a newly typed --lr-head, --threads or data folder",
     "refused in one line naming the typed and the stored value",
     ["integrity:search_resume_with_another_lr_head", "integrity:search_resume_with_other_threads",
      "integrity:search_resume_with_another_data_folder"]),
    ("search --threads unbounded, checked after phase 1", "1 to this machine's cores, refused before phase 1",
     ["integrity:search_threads_unbounded"]),
    ("--target tflm-int8 --max-latency-ms without --latency-from refused after phase 1", "refused before phase 1",
     ["integrity:search_tflm_latency_without_device_times"]),
    ("--out a symlink with --overwrite renames the user's link away", "the link kept, its target replaced",
     [H2B + "test_overwrite_through_a_symlinked_out_keeps_the_link",
      H2B + "test_search_overwrite_through_a_symlinked_out_keeps_the_link"]),
    ("export/ replaced by a symlink leaves an .export-old-PID link", "refused before any work; no link left",
     [H2B + "test_export_into_a_symlinked_export_dir_is_refused_and_leaves_nothing",
      H2B + "test_a_leftover_link_of_a_killed_export_is_removed"]),
    ("export --check blames the run when TMPDIR is full; fails on a copied or renamed run",
     "names TMPDIR; the same bytes for the same model and settings", [H2B + "test_export_check_names_a_full_tmpdir_not_the_run"]),
    ("EDGEFT_CACHE naming a file", "one line, exit 2", ["integrity:cache_is_a_file"]),
    ("a labels / model mismatch found after conversion and the gate", "refused before conversion",
     [H2B + "test_a_model_whose_outputs_are_not_the_runs_classes_is_refused_before_conversion"]),
    ("finetune --resume on a finished run re-saves model.keras", "says so and touches nothing",
     [H2B + "test_resume_of_a_finished_run_touches_nothing"]),
    ("classes with <= 2 images: 'run made before edgeft had a test split'",
     "the right reason: too few images per class, how many a test split needs",
     [H2 + "test_too_few_images_for_a_test_split_says_so"]),
    ("the next: and --resume hints not shell-quoted", "a run directory with a space and quotes comes back whole",
     [H2 + "test_the_next_and_resume_hints_give_back_an_odd_run_directory"]),
    ("a 300-digit percentage for --max-latency-ms 1e-300", "the limit bounded (0.001-1e9); a miss said as a short ratio",
     ["integrity:search_latency_limit_1e_300", SC + "test_a_limit_far_below_the_measurement_prints_a_short_ratio"]),
    ("one message repeated 14 times for --sizes 33", "each reason once, with the backbones it names",
     ["integrity:search_size_fits_no_backbone", SC + "test_a_size_no_backbone_takes_is_one_reason_per_backbone"]),
    ("predict on a .tflite without labels prints ids without a warning", "one warning that ids are printed",
     ["tests/test_predict.py::test_predict_without_labels_warns_once_where_labels_are_read"]),
    ("a FIFO given as an image says 'not found'", "says what it is (a FIFO, a device file)",
     [H2 + "test_a_fifo_given_as_an_image_is_named_for_what_it_is"]),
    ("tests that cannot fail: test_device skips, test_quick's 0 <= accuracy <= 1, fixtures swallowing ParityError, "
     "importorskip of import-linter", "each repaired test fails under a deliberate code change (helper 28B's note)",
     ["tests/test_quick.py::", "tests/test_layout.py::test_contracts_hold", "tests/test_layout.py::test_contracts_can_fail"]),
]


def node_ids(ref: str) -> str:
    """A ROUND2 test reference as a pytest node id (or node id prefix)."""
    return f"{INTEGRITY}[{ref.split(':', 1)[1]}]" if ref.startswith("integrity:") else ref


def _matches(nodeid: str, ref: str) -> bool:
    ref = node_ids(ref)
    return nodeid == ref or (ref.endswith("::") and nodeid.startswith(ref)) or nodeid.startswith(ref + "[")


def expected_of(item) -> str:
    """The "expected: ..." sentence of a test's docstring, on one line."""
    doc = " ".join((getattr(item, "obj", None).__doc__ or "").split()) if getattr(item, "obj", None) else ""
    return doc.split("expected:", 1)[1].strip() if "expected:" in doc else (doc or "(no docstring)")


class Collector:
    """A pytest plugin: selects the faults tests and round 2's tests, and keeps, per test, its
    expectation, outcome and the first line of a failure."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.present: set[str] = set()   # every test collected, before -k deselects

    def pytest_itemcollected(self, item):
        self.present.add(item.nodeid)

    @staticmethod
    def wanted(item) -> bool:
        return bool(item.get_closest_marker("faults")) or any(_matches(item.nodeid, r) for _, _, refs in ROUND2 for r in refs)

    @pytest_hookimpl(trylast=True)   # after -k has deselected
    def pytest_collection_modifyitems(self, session, config, items):
        keep = [i for i in items if self.wanted(i)]
        config.hook.pytest_deselected(items=[i for i in items if not self.wanted(i)])
        items[:] = keep

    def pytest_collection_finish(self, session):
        for item in session.items:
            self.rows[item.nodeid] = {"case": item.nodeid.split("::", 1)[-1], "file": item.nodeid.split("::")[0],
                                      "expected": expected_of(item), "observed": "not run", "seconds": 0.0}

    def pytest_runtest_logreport(self, report):
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        row["seconds"] = round(row["seconds"] + report.duration, 2)
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row["observed"] = f"skipped: {reason.removeprefix('Skipped: ')}"
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            first = (crash.message if crash else str(report.longrepr)).strip().splitlines()[0]
            row["observed"] = f"FAIL ({report.when}): {first[:300]}"
        elif report.when == "call":
            row["observed"] = "pass"


def rounds(rows: dict[str, dict], present: set[str] = frozenset()) -> tuple[list[dict], list[dict]]:
    """(round 1: the faults tests round 2 does not list, round 2: one row per issue-28 case);
    `present`: every test collected (a listed test there but not in `rows` was deselected by -k)."""
    listed = {nodeid for nodeid in rows for _, _, refs in ROUND2 for r in refs if _matches(nodeid, r)}
    first = [r for nodeid, r in rows.items() if nodeid not in listed]
    second = []
    for case, expected, refs in ROUND2:
        got = {ref: [r for nodeid, r in rows.items() if _matches(nodeid, ref)] for ref in refs}
        ran = [r for found in got.values() for r in found]
        missing = [ref for ref, found in got.items() if not found]
        failed = [r for r in ran if r["observed"] != "pass"]
        if not ran and any(_matches(nodeid, ref) for nodeid in present for ref in refs):
            observed = "not run (deselected)"
        elif not ran:
            observed = "no test collected (not in this tree, or its file not given): " + ", ".join(refs)
        elif failed:
            observed = f"{failed[0]['observed']} [{failed[0]['case']}]"
        else:
            observed = f"pass ({len(ran)} test{'s' if len(ran) > 1 else ''})"
        if ran and missing:
            observed += "; not collected: " + ", ".join(missing)
        second.append({"case": case, "expected": expected, "observed": observed, "tests": [r["case"] for r in ran],
                       "seconds": round(sum(r["seconds"] for r in ran), 2)})
    return first, second


def table(rows: list[dict], width: int = 60) -> str:
    head = ("case", "expected", "observed")
    cols = [[r["case"] for r in rows], [r["expected"] for r in rows], [r["observed"] for r in rows]]
    case_w = min(max([len(head[0])] + [len(c) for c in cols[0]]), 70)
    out = [f"{head[0]:<{case_w}}  {head[1]:<{width}}  {head[2]}", "-" * (case_w + width + 24)]
    for r in rows:
        exp = textwrap.wrap(r["expected"], width) or [""]
        obs = textwrap.wrap(r["observed"], 40) or [""]
        for i in range(max(len(exp), len(obs))):
            out.append(f"{(r['case'] if i == 0 else ''):<{case_w}}  {(exp[i] if i < len(exp) else ''):<{width}}  "
                       f"{obs[i] if i < len(obs) else ''}")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="bench_faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-k", metavar="EXPR", help="only the cases whose names match (pytest -k)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("paths", nargs="*", default=[str(REPO / "tests")], help="test files or folders (default: tests/)")
    args = p.parse_args(argv)
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a folder: name a file")
    import pytest

    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    plugin = Collector()
    t0 = time.time()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-n", "0", *(["-k", args.k] if args.k else []),
                        *args.paths, *extra], plugins=[plugin])
    first, second = rounds(plugin.rows, plugin.present)
    doc = {"pytest_exit": int(code)}
    for name, rows in (("round 1", first), ("round 2 (issue 28)", second)):
        held = sum(r["observed"].startswith("pass") for r in rows)
        failed = sum(r["observed"].startswith("FAIL") for r in rows)
        print(f"\n{name}\n" + table(rows))
        print(f"\n{name}: {len(rows)} fault cases: {held} held, {failed} failed, {len(rows) - held - failed} "
              f"skipped, not run or without a test collected")
        doc[name.split(" (")[0].replace(" ", "")] = {"cases": rows, "held": held, "failed": failed}
    print(f"({time.time() - t0:.0f} s)")
    failed = doc["round1"]["failed"] + doc["round2"]["failed"]
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed or int(code) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
