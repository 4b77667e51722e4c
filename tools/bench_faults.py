#!/usr/bin/env python
"""Runs every hostile-input / fault test (`pytest -m faults`) and prints a table: case, what edgeft
promises (the test's "expected: ..." docstring) and what was observed (pass, FAIL with the first
line of the failure, or skipped with the reason), then the same as JSON.

    python tools/bench_faults.py                      # every faults test under tests/
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

REPO = Path(__file__).resolve().parent.parent


def expected_of(item) -> str:
    """The "expected: ..." sentence of a test's docstring, on one line."""
    doc = " ".join((getattr(item, "obj", None).__doc__ or "").split()) if getattr(item, "obj", None) else ""
    return doc.split("expected:", 1)[1].strip() if "expected:" in doc else (doc or "(no docstring)")


class Collector:
    """A pytest plugin keeping, per test, its expectation, outcome and the first line of a failure."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def pytest_collection_finish(self, session):   # after -m / -k deselection
        for item in session.items:
            if item.get_closest_marker("faults"):
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
    code = pytest.main(["-m", "faults", "-q", "-p", "no:cacheprovider", "-n", "0", *(["-k", args.k] if args.k else []),
                        *args.paths, *extra], plugins=[plugin])
    rows = list(plugin.rows.values())
    print("\n" + table(rows))
    held = sum(r["observed"] == "pass" for r in rows)
    failed = sum(r["observed"].startswith("FAIL") for r in rows)
    print(f"\n{len(rows)} fault cases: {held} held, {failed} failed, {len(rows) - held - failed} skipped or not run "
          f"({time.time() - t0:.0f} s)")
    doc = {"cases": rows, "held": held, "failed": failed, "pytest_exit": int(code)}
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed or int(code) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
