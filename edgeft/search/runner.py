"""`edgeft search`: the most accurate model that fits the device (docs/search.md).

Phase 1 measures every candidate's untrained target file (no training); phase 2 trains the ones
that fit, with successive halving on validation accuracy (stage 1 for all, stage 2 for the better
part); phase 3 exports and gates the finalists' files and chooses by the shipped file's
validation accuracy. Everything is kept in the search directory, so a killed search continues
with --resume.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeft.core import logs, owned, rundir
from edgeft.core.errors import OperationFailed, UserError
from edgeft.core.progress import Progress
from edgeft.search import measure
from edgeft.search.checks import check_latency_source, check_new, check_resume, resolved
from edgeft.search.choose import choose, promoted, rank
from edgeft.core.byob import is_file_backbone
from edgeft.search.space import (FILE_KEYS, PHASE1_SIZE_SLACK, TARGETS, Candidate, Limits, build_space, candidate_values,
                                 candidate_weights, check_weights, default_backbones, describe_misses, misses)
from edgeft.search.trials import RUNGS, Trials
from edgeft.search.work import LOGS, RUNS, SETTINGS, worker_loop

log = logging.getLogger(__name__)

PHASE1 = "phase1"            # <id>.json per candidate, files/ the untrained files, edgeft_device.py
PHASE3 = "phase3"            # <id>.json: the trained file measured again
JOURNAL = "search.journal"   # Optuna's journal file storage (the default --storage)
PLAN = "plan.md"
FORMAT = "edgeft-search"


@dataclass
class SearchOptions:
    folder: str
    out: str
    backbones: list[str] | None = None
    alphas: list[float] | None = None
    sizes: list[int] | None = None
    # None: not given (a new search takes checks.DEFAULTS; --resume the stored value, a different one is refused)
    weights: str | None = None
    target: str | None = None
    threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    plan: bool = False
    latency_from: str | None = None
    resume: bool = False
    overwrite: bool = False
    workers: int = 1
    storage: str | None = None
    finalists: int | None = None
    keep: float | None = None
    runs: int | None = None
    warmup: int = 10
    train_values: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the directory
def _read_settings(out: Path) -> dict:
    """DIR/search.json, checked: one line (UserError) for a file that is not JSON, not a mapping, or
    whose limits hold a key edgeft does not know (a hand edit)."""
    import json
    from dataclasses import fields

    try:
        s = json.loads((out / SETTINGS).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{out / SETTINGS} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); was it edited by "
                        f"hand? Restore it, or start a new search with --overwrite") from None
    if not isinstance(s, dict):
        raise UserError(f"{out / SETTINGS} does not hold a search's settings (not a JSON object)")
    limits = s.get("limits", {})
    known = {f.name for f in fields(Limits)}
    if not isinstance(limits, dict) or set(limits) - known:
        extra = sorted(set(limits) - known) if isinstance(limits, dict) else [type(limits).__name__]
        raise UserError(f"{out / SETTINGS}: unknown limits key(s) {', '.join(map(str, extra))[:200]}; known: "
                        f"{', '.join(sorted(known))}")
    return s


def _protected(o: SearchOptions) -> dict:
    from edgeft.data.cache import cache_root

    return {"data": (o.folder,), "cache": cache_root()}


def _prepare(o: SearchOptions) -> dict | None:
    """The stored settings of a search to continue, or None for a new one (DIR checked, nothing
    changed: --overwrite replaces only an edgeft search directory holding nothing else, see
    core/owned.py)."""
    out = Path(o.out)
    stored = _read_settings(out) if (out / SETTINGS).is_file() else None
    if stored is not None and stored.get("format") != FORMAT:
        stored = None
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    planned_only = stored is not None and stored.get("state") == "planned"
    if o.resume or (o.latency_from and planned_only):
        if stored is None or owned.header(out) not in (None, "search"):
            raise UserError(f"nothing to resume: {out} is not an edgeft search directory (no {SETTINGS})")
        return stored
    if non_empty:
        if not o.overwrite:
            raise UserError(f"{out} already exists and is not empty; use --overwrite to replace it or --resume "
                            f"to continue it")
        owned.check_replaceable(out, "search", **_protected(o))
    rundir.check_writable(out, "--out")
    return None


# what a search makes in DIR (Optuna's journal keeps its lock beside it: search.journal.lock*)
_OWN = (SETTINGS, JOURNAL, JOURNAL + ".lock", PHASE1, PHASE3, RUNS, LOGS, PLAN, "best", "results.json",
        "results.csv", "pareto.png", "report.md")


def _replace_dir(out: Path, o: SearchOptions) -> None:
    """DIR emptied (an old search set aside, then removed) and marked as a search directory; the
    caller holds the old directory's lock."""
    if out.is_dir() and any(out.iterdir()):
        owned.check_replaceable(out, "search", **_protected(o))   # again, under the lock
        rundir.empty_dir(out)   # --out a symbolic link: the directory it names is emptied, the link kept
    out.mkdir(parents=True, exist_ok=True)
    owned.mark(out, "search")
    owned.own(*(out / n for n in _OWN))


def _new_settings(o: SearchOptions) -> dict:
    weights = check_weights(resolved(o, "weights"))
    backbones = o.backbones
    if backbones is None:
        backbones, why = default_backbones(weights)
        if why:
            log.info(f"search: {why}")
    space = build_space(backbones, o.alphas, o.sizes, weights)
    for what, why in space.left_out:
        log.debug(f"search: left out {what}: {why}")
    if space.left_out:
        log.info(f"search: left out {len(space.left_out)} backbone / size pair(s) ({_few([w for w, _ in space.left_out])}; "
                 "why: report.md and the log)")
    cands, skipped = [], []
    for c in space.candidates:
        w, why = candidate_weights(weights, c)
        (skipped.append(c.as_dict() | {"reason": why}) if why else cands.append(c.as_dict() | {"weights": w}))
    for c in skipped:
        log.debug(f"search: skipped {c['id']}: {c['reason']}")
    if skipped:
        log.info(f"search: skipped {len(skipped)} candidate(s) without weights ({_few([c['id'] for c in skipped])}; "
                 f"why: the log)")
    if not cands:
        raise UserError("no candidate has its weights: " + "; ".join(f"{c['id']}: {c['reason']}" for c in skipped))
    target = TARGETS[resolved(o, "target")]
    return {"format": FORMAT, "version": 1, "state": "new", "study": f"edgeft-search-{uuid.uuid4().hex[:12]}",
            "storage": o.storage, "folder": os.path.abspath(o.folder), "weights": weights, "candidates": cands,
            "skipped": skipped, "target": asdict(target), "threads": resolved(o, "threads"),
            "runs": resolved(o, "runs"), "warmup": o.warmup, "limits": asdict(o.limits),
            "finalists": resolved(o, "finalists"), "keep": resolved(o, "keep"), "train_values": o.train_values,
            "space": {"backbones": o.backbones, "alphas": o.alphas, "sizes": o.sizes},   # as typed (--resume checks)
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def storage_spec(out: Path, s: dict) -> str:
    return s.get("storage") or str(out / JOURNAL)


# ---------------------------------------------------------------- phase 1
def _splits_for(s: dict, size: int):
    from edgeft.core.config import build_config
    from edgeft.run import run_splits

    cfg = build_config({**candidate_values(s["train_values"], ""), "folder": s["folder"], "image_size": size})
    return cfg, run_splits(cfg)


def phase1(out: Path, s: dict, host_timing: bool) -> dict[str, dict]:
    """{candidate: measurements of its untrained file}; stored per candidate, never repeated."""
    from edgeft.data.datasets import representative_images
    from edgeft.search.space import Target

    target = Target(**s["target"])
    limits = Limits(**s["limits"])
    want_arena = target.runtime == "tflm" or limits.arena_kb is not None
    files = out / PHASE1 / "files"
    records, by_size = {}, {}
    todo = [c for c in s["candidates"] if not (out / PHASE1 / f"{c['id']}.json").is_file()]
    for c in s["candidates"]:
        if c not in todo:
            records[c["id"]] = rundir.read_json(out / PHASE1 / f"{c['id']}.json")
    with Progress("phase 1: measuring untrained files", len(todo), unit="candidates") as bar:
        for c in todo:
            t0 = time.perf_counter()
            if c["size"] not in by_size:
                cfg, splits = _splits_for(s, c["size"])
                by_size[c["size"]] = (cfg, list(splits.classes),
                                      representative_images(splits.train, measure.CALIBRATION_IMAGES, cfg.train.seed))
            cfg, labels, rep = by_size[c["size"]]
            file_keys = {k: s["train_values"].get(k) for k in FILE_KEYS} if is_file_backbone(c["backbone"]) else {}
            model_cfg = replace(cfg.model, weights=c.get("weights") or s["weights"], **file_keys)   # as its run starts
            with _logged(out, "phase1"):
                data, params = measure.untrained_file(Candidate(c["backbone"], c["alpha"], c["size"]), target,
                                                      labels, rep, replace(cfg, model=model_cfg), for_tflm=want_arena)
            path = files / f"{c['id']}{measure.SUFFIX[target.runtime]}"
            rundir.write_bytes(path, data)
            convert_s = time.perf_counter() - t0
            rec = measure.measure(path, target, s["threads"], s["runs"], s["warmup"], want_arena, host_timing)
            rec |= {"id": c["id"], "params": params, "file": str(path.relative_to(out)), "convert_seconds": round(convert_s, 2),
                    "seconds": round(time.perf_counter() - t0, 2)}
            rundir.write_json(out / PHASE1 / f"{c['id']}.json", rec)
            records[c["id"]] = rec
            bar.update(1)
    return records


def _logged(out: Path, name: str):
    """What the converters log, into DIR/logs/NAME.log (the terminal keeps the search's own lines)."""
    return logs.diverted(out / LOGS / f"{name}.log")


def write_plan(out: Path, s: dict) -> str:
    """The device script beside the phase-1 files, and the one command that times them all."""
    dest = out / PHASE1 / "edgeft_device.py"
    from edgeft import device

    rundir.write_bytes(dest, Path(device.__file__).read_bytes())
    cmd = (f"python3 edgeft_device.py bench files --random --threads {s['threads']} --runs {s['runs']} "
           f"--warmup-runs {s['warmup']} --json bench.json")
    text = (f"# Timing the search's candidates on the device\n\n"
            f"Copy `{out / PHASE1}` to the device (it holds the {len(s['candidates'])} untrained candidate files and "
            f"the device script; the device needs numpy, pillow and its runtime), then, in that folder:\n\n"
            f"    {cmd}\n\n"
            f"Each file runs in a process of its own (its RAM: peak RSS less an empty process's). Bring bench.json "
            f"back and continue the search with its times:\n\n"
            f"    edgeft search {s['folder']} --out {out} --latency-from bench.json\n\n"
            f"(files are matched by sha256: the JSON of other files is refused)\n")
    rundir.write_text(out / PLAN, text)
    return cmd


def apply_device_times(records: dict[str, dict], bench_path: str) -> None:
    """Each record's latency and RAM from the device's bench JSON (matched by sha256)."""
    bench = measure.read_bench_json(bench_path)
    ours = {r["sha256"] for r in records.values()}
    foreign = [f.get("file", "?") for f in bench["files"] if f.get("sha256") not in ours]
    if foreign:
        raise UserError(f"--latency-from {bench_path}: {len(foreign)} file(s) are not this search's candidates "
                        f"(sha256 differs), e.g. {foreign[0]}: time the files `--plan` wrote")
    missing = []
    for cid, rec in records.items():
        dev = measure.from_device(bench, rec["sha256"])
        if dev is None:
            missing.append(cid)
            continue
        rec.update(dev)
    if missing:
        raise UserError(f"--latency-from {bench_path} has no time for {len(missing)} candidate(s) ({', '.join(missing[:3])}"
                        f"{'...' if len(missing) > 3 else ''}): time every file in {PHASE1}/files")


# ---------------------------------------------------------------- phase 2 and 3
def run_rung(out: Path, s: dict, trials: Trials, rung: int, ids: list[str], workers: int) -> None:
    """Enqueues `ids` for `rung`, runs them (here, or in `workers` processes) and waits for the rung."""
    again = trials.recover_stale()
    if again:
        log.info(f"search: trials left running by a killed worker, run again: {', '.join(again)}")
    trials.enqueue(rung, ids)
    if not trials.pending(rung):
        return
    workers = min(workers, len(trials.pending(rung)))   # never more processes than trials to claim
    log.info(f"search: {RUNGS[rung]} for {len(trials.pending(rung))} candidate(s)"
             + (f" in {workers} worker processes" if workers > 1 else ""))
    if workers > 1:
        # each worker in its own process group, killed with the coordinator (a killed search leaves no
        # worker training on: PR_SET_PDEATHSIG where Linux has it, else when the coordinator unwinds)
        procs = [subprocess.Popen([sys.executable, "-m", "edgeft.search.worker", str(out)], env=_child_env(),
                                  preexec_fn=_die_with_parent) for _ in range(workers)]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            log.info(f"search: worker exit codes {codes}")
    while True:   # what is left (a worker that failed, or workers on other machines sharing --storage)
        worker_loop(out, trials)
        if not trials.pending(rung):
            return
        time.sleep(5)
        trials.recover_stale()


NEAREST_SHOWN = 5   # the console's share of the nearest candidates (all of them in report.md)


def _few(names: list[str], k: int = 3) -> str:
    """'a, b, c and 4 more': a console line stays short however many candidates there are."""
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _die_with_parent() -> None:
    """In a worker, before it starts: the kernel sends it SIGKILL when the coordinator dies (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _child_env() -> dict:
    root = str(Path(__file__).resolve().parent.parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def remeasure(out: Path, s: dict, cid: str, shipped_file: str) -> dict:
    """The trained, shipped file measured as phase 1 measured the untrained one (once)."""
    from edgeft.search.space import Target

    target = Target(**s["target"])
    path = out / shipped_file
    sha = measure.device.file_sha256(path)
    stored = rundir.read_json(out / PHASE3 / f"{cid}.json", None)
    if stored and stored.get("sha256") == sha:
        return stored
    want_arena = target.runtime == "tflm" or Limits(**s["limits"]).arena_kb is not None
    rec = measure.measure(path, target, s["threads"], s["runs"], s["warmup"], want_arena)
    rundir.write_json(out / PHASE3 / f"{cid}.json", rec)
    return rec


def search(o: SearchOptions) -> dict:
    """Lock first, then act: every check that reads DIR is made again under DIR's lock before
    anything there is renamed, removed or written, and a refused command leaves DIR as it was."""
    from edgeft.core.lock import run_lock

    out = Path(o.out)
    if o.latency_from and not Path(o.latency_from).is_file():
        raise UserError(f"--latency-from {o.latency_from}: file not found")
    if o.latency_from:
        measure.read_bench_json(o.latency_from)   # every entry checked before anything is read or written
    check_new(o)   # the typed values (checks.py): before anything is read, made or imported
    stored = _prepare(o)   # refusals that need no lock, before anything is made (the lock file included)
    check_latency_source(o, stored)
    if stored is not None:
        check_resume(o, stored, out / SETTINGS)
    with contextlib.ExitStack() as locks:
        if out.is_dir():
            locks.enter_context(run_lock(out, "search"))   # a search running there refuses this one
        stored = _prepare(o)
        if stored is not None:
            check_resume(o, stored, out / SETTINGS)   # under the lock: the settings the search runs with
        if stored is None:
            s = _new_settings(o)   # may refuse (weights, space): nothing replaced yet
            _replace_dir(out, o)
            locks.close()   # the old directory's lock went with it
            locks.enter_context(run_lock(out, "search"))
            rundir.write_json(out / SETTINGS, s)
        else:
            s = stored
            if o.limits != Limits() and o.limits != Limits(**s["limits"]):
                log.info(f"search: limits now {o.limits.describe()} (were {Limits(**s['limits']).describe()})")
                s["limits"] = asdict(o.limits)   # stored once the search has accepted its inputs (_search)
        locks.enter_context(logs.run_log(out))   # DIR/logs/edgeft.log: the search's own lines, and more
        return _search(out, s, o)


def _search(out: Path, s: dict, o: SearchOptions) -> dict:
    from edgeft.search.report import Row, write_results

    limits, target = Limits(**s["limits"]), TARGETS[s["target"]["name"]]
    host_timing = not (o.plan or o.latency_from or s.get("latency_from"))
    records = phase1(out, s, host_timing)
    if o.plan:
        s["state"] = "planned"
        rundir.write_json(out / SETTINGS, s)
        cmd = write_plan(out, s)
        log.info(f"search: {len(records)} candidate files in {out / PHASE1 / 'files'}; on the device, in a copy of "
                 f"{out / PHASE1}:\n    {cmd}\nthen: edgeft search {s['folder']} --out {out} --latency-from bench.json "
                 f"(see {out / PLAN})")
        return {"planned": len(records)}
    if o.latency_from:
        apply_device_times(records, o.latency_from)
        for cid, rec in records.items():
            rundir.write_json(out / PHASE1 / f"{cid}.json", rec)
        s["latency_from"] = os.path.abspath(o.latency_from)
    s["state"] = "searching"
    rundir.write_json(out / SETTINGS, s)
    device_times = bool(s.get("latency_from")) or not target.host_latency

    def judged(r) -> dict:
        """The trained file's numbers; its latency and RAM from the device when phase 1 had them
        from there (weights do not change them; this host's timing would be another machine's)."""
        return {**r.phase3, "latency_ms": r.phase1.get("latency_ms"), "ram_mb": r.phase1.get("ram_mb")} \
            if device_times else r.phase3

    rows = {c["id"]: Row.new(c, records[c["id"]]) for c in s["candidates"]}
    near = []
    for r in rows.values():
        r.phase1_misses = misses(r.phase1, limits, target, size_slack=PHASE1_SIZE_SLACK)
        if r.phase1_misses:
            r.stop("phase 1", "breaks " + describe_misses(r.phase1_misses))
        elif misses(r.phase1, limits, target):   # within the slack: trained, then judged on its shipped file
            near.append(r.id)
            log.debug(f"search: {r.id}: its untrained file is {describe_misses(misses(r.phase1, limits, target))}, "
                      f"within {PHASE1_SIZE_SLACK:.0%} of the limit: trained, then judged by the size of its shipped file")
    if near:
        log.info(f"search: {len(near)} candidate(s) just over the size limit untrained, within {PHASE1_SIZE_SLACK:.0%} "
                 f"({_few(near)}): trained, then judged by the size of the file they ship")
    feasible = [cid for cid, r in rows.items() if not r.phase1_misses]
    log.info(f"search: {len(feasible)} of {len(rows)} candidates fit the limits ({limits.describe(target)}) before training")
    if not feasible:
        return _nothing_fits(out, s, rows, limits, "before training")
    trials = Trials(storage_spec(out, s), s["study"], [c["id"] for c in s["candidates"]])
    # phase 2: stage 1 for every feasible candidate, stage 2 for the better part
    run_rung(out, s, trials, 0, feasible, o.workers)
    v0 = _collect(trials, 0, rows, "stage1", feasible)   # (a resumed search with new limits: the ones that fit now)
    stage2_ids = promoted(v0, s["keep"], s["finalists"])
    for cid in rank(v0)[len(stage2_ids):]:
        rows[cid].stop("stage 1", f"validation accuracy {v0[cid]:.4f} below the better part going on")
    run_rung(out, s, trials, 1, stage2_ids, o.workers)
    v1 = _collect(trials, 1, rows, "stage2", stage2_ids)
    # phase 3: the finalists' shipped files; a finalist refused by the gate or a limit: the next takes its place
    order, finalists, done = rank(v1), [], set()
    while True:
        want = [c for c in order if c not in done][: max(0, s["finalists"] - len(finalists))]
        if not want:
            break
        run_rung(out, s, trials, 2, want, o.workers)
        v2 = _collect(trials, 2, rows, "shipped", want)
        for cid in want:
            done.add(cid)
            if cid not in v2:
                continue
            r = rows[cid]
            r.phase3 = remeasure(out, s, cid, r.shipped["file"])
            r.phase3_misses = misses(judged(r), limits, target)
            if r.phase3_misses:
                r.stop("phase 3", "its trained file breaks " + describe_misses(r.phase3_misses))
            elif limits.min_accuracy is not None and v2[cid] < limits.min_accuracy:
                r.stop("phase 3", f"its shipped file's validation accuracy {v2[cid]:.4f} < --min-accuracy "
                                  f"{limits.min_accuracy:g}")
            else:
                finalists.append(cid)
    for cid in order[len(done):]:
        rows[cid].stop("stage 2", "not among the finalists")
    candidates = [{"id": cid, "val_correct": [ch == "1" for ch in rows[cid].shipped["val_correct"]],
                   "latency": (judged(rows[cid]).get("latency_ms") or {}).get(limits.latency_stat),
                   "size_bytes": rows[cid].phase3["size_bytes"], "eligible": True}
                  for cid in finalists]
    decision = choose(candidates, seed=int(s["train_values"].get("seed", 0) or 0))
    if decision["chosen"] is None:
        return _nothing_fits(out, s, rows, limits, "after training")
    rows[decision["chosen"]].chosen = True
    for cid in finalists:
        if cid != decision["chosen"]:
            rows[cid].stop("phase 3", "finalist, not chosen")
    rows[decision["chosen"]].reached = "chosen"
    _link_best(out, decision["chosen"])
    s["state"] = "done"
    rundir.write_json(out / SETTINGS, s)
    result = write_results(out, s, list(rows.values()), decision, limits)
    c = rows[decision["chosen"]]
    lat = next(f["latency"] for f in candidates if f["id"] == c.id)
    log.info(f"search: chosen {c.id}: validation accuracy {c.shipped['val_accuracy']:.4f}, "
             f"{c.phase3['size_bytes'] / 1000:.1f} KB" + (f", {limits.latency_stat} {lat:.3f} ms" if lat is not None else ""))
    log.debug(f"search: {out / 'best'} -> {RUNS}/{c.id}")
    log.debug(f"search: rule: {decision['rule']}")   # in full in report.md
    log.info(f"search: report: {out / 'report.md'}")   # the rule that chose it, every candidate (a short label: paths are long)
    log.info(f"next: edgeft benchmark {shlex.quote(str(out / 'best'))}")
    return result


def _collect(trials: Trials, rung: int, rows: dict, what: str, among: list[str]) -> dict[str, float]:
    """{candidate: validation accuracy} of the rung's finished trials of `among`; the rows updated."""
    values = {}
    for cid, t in trials.results(rung).items():
        if cid in among:
            values[cid] = float(t.value)
            rows[cid].record(what, t.value, dict(t.user_attrs))
    for cid, t in trials.failures(rung).items():
        if cid in among and cid not in values:
            rows[cid].stop(RUNGS[rung], t.user_attrs.get("reason", "failed"))
    return values


def _link_best(out: Path, cid: str) -> None:
    link, tmp = out / "best", out / f".best.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(RUNS) / cid, tmp)
    os.replace(tmp, link)


def _nothing_fits(out: Path, s: dict, rows: dict, limits: Limits, when: str):
    from edgeft.search.report import nearest, write_results

    write_results(out, s, list(rows.values()), None, limits)
    lines = nearest(list(rows.values()))
    target = TARGETS[s["target"]["name"]]
    log.info(f"search: no candidate meets every limit ({limits.describe(target)}) {when}; the nearest:")
    for line in lines[:NEAREST_SHOWN]:
        log.info(f"  {line}")
    for line in lines[NEAREST_SHOWN:]:
        log.debug(f"  {line}")
    raise OperationFailed(f"no candidate fits ({limits.describe(target)}); the nearest are listed above and in "
                          f"{out / 'report.md'}")
