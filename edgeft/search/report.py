"""What a search leaves in its directory: results.csv / results.json (a row per candidate),
pareto.png (accuracy against latency), report.md (the table, the plot, the rule and the choice)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.core import rundir
from edgeft.core.stats import wilson_interval
from edgeft.search.space import TARGETS, Limits, describe_misses

COLUMNS = ["id", "backbone", "alpha", "size", "params", "size_kb", "latency_p50_ms", "latency_p95_ms",
           "latency_measured", "trained_latency_measured", "trained_size_kb", "trained_latency_p50_ms", "trained_latency_p95_ms", "arena_kb",
           "flash_kb", "ram_mb", "stage1_val_accuracy", "stage2_val_accuracy", "val_n", "shipped_val_accuracy",
           "shipped_val_low", "shipped_val_high", "test_accuracy", "test_low", "test_high", "reached", "stopped_why",
           "chosen"]


@dataclass
class Row:
    id: str
    cand: dict
    phase1: dict
    phase3: dict = field(default_factory=dict)
    phase1_misses: list = field(default_factory=list)
    phase3_misses: list = field(default_factory=list)
    stage1: float | None = None
    stage2: float | None = None
    shipped: dict = field(default_factory=dict)
    reached: str = "phase 1"
    why: str = ""
    chosen: bool = False
    val_n: int | None = None   # validation images the accuracies are measured on

    @classmethod
    def new(cls, cand: dict, phase1: dict) -> "Row":
        return cls(cand["id"], cand, phase1)

    def record(self, what: str, value: float, attrs: dict) -> None:
        self.val_n = attrs.get("val_n") or self.val_n
        if what == "stage1":
            self.stage1, self.reached = value, "stage 1"
        elif what == "stage2":
            self.stage2, self.reached = value, "stage 2"
        else:
            self.shipped, self.reached = attrs, "phase 3"

    def stop(self, where: str, why: str) -> None:
        self.why = f"{where}: {why}"

    def as_dict(self) -> dict:
        p1, p3 = self.phase1, self.phase3
        lat1, lat3 = p1.get("latency_ms") or {}, p3.get("latency_ms") or {}
        val_n = self.shipped.get("val_n")
        val_ok = round(self.shipped["val_accuracy"] * val_n) if val_n else None
        lo, hi = wilson_interval(val_ok, val_n) if val_n else (None, None)
        kb = lambda b: None if b is None else round(b / 1000, 2)   # noqa: E731
        return {"id": self.id, "backbone": self.cand["backbone"], "alpha": self.cand["alpha"], "size": self.cand["size"],
                "params": p1.get("params"), "size_kb": kb(p1.get("size_bytes")), "latency_p50_ms": lat1.get("p50"),
                "latency_p95_ms": lat1.get("p95"), "latency_measured": p1.get("latency_source"),
                "trained_latency_measured": p3.get("latency_source"), "trained_size_kb": kb(p3.get("size_bytes")), "trained_latency_p50_ms": lat3.get("p50"),
                "trained_latency_p95_ms": lat3.get("p95"), "arena_kb": kb(p3.get("arena_bytes", p1.get("arena_bytes"))),
                "flash_kb": kb(p3.get("flash_bytes", p1.get("flash_bytes"))),
                "ram_mb": p3.get("ram_mb", p1.get("ram_mb")), "stage1_val_accuracy": self.stage1,
                "stage2_val_accuracy": self.stage2, "val_n": self.shipped.get("val_n") or self.val_n,
                "shipped_val_accuracy": self.shipped.get("val_accuracy"),
                "shipped_val_low": lo, "shipped_val_high": hi, "test_accuracy": self.shipped.get("test_accuracy"),
                "test_low": self.shipped.get("test_low"), "test_high": self.shipped.get("test_high"),
                "reached": self.reached, "stopped_why": "" if self.chosen else self.why, "chosen": self.chosen}


def nearest(rows: list[Row], k: int = 3) -> list[str]:
    """The candidates closest to fitting: by how much each misses its worst limit."""
    def worst(r: Row) -> float:
        ms = r.phase3_misses or r.phase1_misses
        return max((v / lim - 1 for _, v, lim in ms), default=0.0)

    missing = [r for r in rows if r.phase1_misses or r.phase3_misses]
    others = [r for r in rows if r not in missing]
    lines = [f"{r.id}: {describe_misses(r.phase3_misses or r.phase1_misses)}" for r in sorted(missing, key=worst)[:k]]
    lines += [f"{r.id}: {r.why}" for r in others[: max(0, k - len(lines))] if r.why]
    return lines


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec) if isinstance(v, float) else str(v)


def markdown(s: dict, table: list[dict], decision: dict | None, limits: Limits, plot: bool) -> str:
    target = s["target"]
    where = sorted({r["latency_measured"] for r in table if r["latency_measured"]})
    lines = [f"# Search: {s['folder']}", "",
             f"{len(table)} candidates, target {target['name']} ({target['filename']} on {target['runtime']}), "
             f"{s['threads']} thread(s); limits: {limits.describe(TARGETS[target['name']])}; {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "Latency measured: " + ("; ".join(where) if where else "nowhere (TFLite Micro without device times)")
             + (" (this host: the fallback; `--plan` / `--latency-from` time the files on the device)"
                if any(w.startswith("host") for w in where) else ""), ""]
    if decision and decision.get("chosen"):
        lines += [f"**Chosen: {decision['chosen']}** (most accurate eligible: {decision['most_accurate']}); "
                  f"`edgeft export DIR/best` and `edgeft benchmark DIR/best` (DIR: this folder) work on it from any "
                  f"directory; `best` links to {Path('runs') / decision['chosen']} (relative: DIR may move).", ""]
        for c in decision["comparisons"]:
            lines.append(f"- {c['candidate']} vs {c['against']}: accuracy difference {c['difference']:+.3f} "
                         f"[{c['low']:+.3f}, {c['high']:+.3f}] -> {'not worse: chosen' if c['not_worse'] else 'worse'}")
        lines.append("")
    else:
        lines += ["**Nothing fits.** The nearest candidates: " + "; ".join(decision.get("nearest", []) if decision else []), ""]
    lines += [f"Rule: {decision['rule'] if decision else ''}", ""]
    if plot:
        lines += ["![accuracy against latency](pareto.png)", ""]
    head = ["candidate", "KB", "p50 ms", "p95 ms", "trained KB", "trained p95", "arena KB", "RAM MB", "stage 1",
            "stage 2", "shipped val", "test [95 %]", "reached", "why it stopped"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        test = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f} [{r['test_low']:.3f}, {r['test_high']:.3f}]"
        name = f"**{r['id']}**" if r["chosen"] else r["id"]
        lines.append("| " + " | ".join([name, _fmt(r["size_kb"], ".1f"), _fmt(r["latency_p50_ms"]), _fmt(r["latency_p95_ms"]),
                                        _fmt(r["trained_size_kb"], ".1f"), _fmt(r["trained_latency_p95_ms"]),
                                        _fmt(r["arena_kb"], ".1f"), _fmt(r["ram_mb"], ".1f"),
                                        _fmt(r["stage1_val_accuracy"]), _fmt(r["stage2_val_accuracy"]),
                                        _fmt(r["shipped_val_accuracy"]), test, r["reached"],
                                        r["stopped_why"].replace("|", "/")]) + " |")
    lines += ["", "Validation accuracy ranks and chooses; the test split (reported) was used for nothing."]
    return "\n".join(lines) + "\n"


LIMIT_GID = "limit"          # gid of each limit's line: "limit:<flag>"
POINTS_GID, ERRORS_GID, UNTRAINED_GID = "candidates", "intervals", "untrained"


def plotted_latency(r: dict, stat: str) -> tuple[float | None, str]:
    """(latency, where it was timed) that pareto.png shows for a row: the device's when the search
    has device times (the limits judged those), else the trained file's, else the untrained file's."""
    opts = [(r.get(f"trained_latency_{stat}_ms"), r.get("trained_latency_measured") or ""),
            (r.get(f"latency_{stat}_ms"), r.get("latency_measured") or "")]
    opts = [o for o in opts if o[0] is not None and o[0] > 0]
    device = [o for o in opts if o[1].startswith("device")]
    return (device or opts or [(None, "")])[0]


def plotted_accuracy(r: dict) -> tuple[float | None, float | None, float | None]:
    """(validation accuracy, low, high of its 95 % Wilson interval): the shipped file's, else stage
    2's, else stage 1's; no interval where the number of validation images is unknown."""
    if r.get("shipped_val_accuracy") is not None:
        return r["shipped_val_accuracy"], r.get("shipped_val_low"), r.get("shipped_val_high")
    acc = next((r[k] for k in ("stage2_val_accuracy", "stage1_val_accuracy") if r.get(k) is not None), None)
    n = r.get("val_n")
    if acc is None or not n:
        return acc, None, None
    lo, hi = wilson_interval(round(acc * n), n)
    return acc, min(lo, acc), max(hi, acc)


def _where(sources: list[str]) -> str:
    """The x label's second line: where the latencies were timed."""
    kinds = sorted({src.split(":", 1)[0] for src in sources if src})
    if not kinds:
        return "timed nowhere"
    names = {"device": "timed on the device", "host": "timed on this host (the fallback, not the device)"}
    first = next(src for src in sources if src)
    detail = first.split(":", 1)[1].strip() if ":" in first else first
    return "; ".join(names.get(k, k) for k in kinds) + (f": {detail[:60]}" if len(kinds) == 1 else "")


def pareto_figure(table: list[dict], limits: Limits, flash: bool = False):
    """Validation accuracy (95 % intervals as error bars) against each measured quantity, one panel
    each on a log axis: latency (marker area by file size, when any latency was timed), file size
    (flash for TFLite Micro), and the arena and RAM where a limit asks for them; every limit drawn;
    grey = breaks a limit, red ring = chosen, x at the bottom = not trained. None: nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stat = limits.latency_stat
    def size_of(r: dict):   # the trained file's size when measured (flash: the trained one's already)
        return r.get("flash_kb") if flash else (r.get("trained_size_kb") or r.get("size_kb"))

    lat = {r["id"]: plotted_latency(r, stat) for r in table}
    panels = []
    if any(v is not None for v, _ in lat.values()):
        panels.append(("latency", lambda r: lat[r["id"]][0], limits.latency_ms, f"--max-latency-ms ({stat})",
                       f"{stat} latency, ms (batch 1, log scale)\n{_where([lat[r['id']][1] for r in table])}"))
    panels.append(("size", size_of, limits.size_kb, "--max-size-kb",
                   f"{'flash' if flash else 'file size'}, KB (1000 bytes, log scale)"))
    if limits.arena_kb is not None:
        panels.append(("arena", lambda r: r.get("arena_kb"), limits.arena_kb, "--max-arena-kb",
                       "TFLite Micro arena, KB (log scale)"))
    if limits.ram_mb is not None:
        panels.append(("ram", lambda r: r.get("ram_mb"), limits.ram_mb, "--max-ram-mb", "RAM, MB (log scale)"))
    if not any(x(r) for _, x, *_ in panels for r in table):
        return None
    accs = {r["id"]: plotted_accuracy(r) for r in table}
    known = [v for a, lo, hi in accs.values() if a is not None for v in (a, lo, hi) if v is not None]
    known += [limits.min_accuracy] if limits.min_accuracy is not None else []
    y_lo, y_hi = (min(known), max(known)) if known else (0.0, 1.0)
    pad = max(0.02, 0.08 * (y_hi - y_lo))
    y_lo, y_hi = max(-0.02, y_lo - 2 * pad), min(1.02, y_hi + pad)
    untrained_y = y_lo + 0.4 * pad
    sizes = [size_of(r) or 0.0 for r in table]
    biggest = max(sizes) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 0.8, 5.0), squeeze=False)
    for ax, (name, xof, limit, flag, xlabel) in zip(axes[0], panels):
        xs = [xof(r) for r in table]
        for r, x, kb in zip(table, xs, sizes):
            if not x or x <= 0:
                continue
            acc, lo, hi = accs[r["id"]]
            infeasible = r["stopped_why"].startswith(("phase 1: breaks", "phase 3: its trained file breaks"))
            area = 20.0 + 280.0 * math.sqrt(kb / biggest) if name == "latency" else 30.0
            if acc is None:
                ax.scatter([x], [untrained_y], marker="x", color="0.5", s=25, gid=UNTRAINED_GID)
                ax.annotate(r["id"], (x, untrained_y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                            color="0.4")
                continue
            marker = "s" if name == "latency" and lat[r["id"]][1].startswith("host") else "o"
            if lo is not None:
                bars = ax.errorbar([x], [acc], yerr=[[acc - lo], [hi - acc]], fmt="none", ecolor="0.35",
                                   elinewidth=0.8, capsize=2)
                for c in bars.lines[2]:
                    c.set_gid(ERRORS_GID)
            ax.scatter([x], [acc], s=area, alpha=0.6, marker=marker, color="0.75" if infeasible else "tab:blue",
                       edgecolors="k", linewidths=0.4, gid=POINTS_GID)
            if r["chosen"]:
                ax.scatter([x], [acc], s=area * 2.2, facecolors="none", edgecolors="tab:red", linewidths=2)
            ax.annotate(r["id"], (x, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
        present = [x for x in xs if x and x > 0] + ([limit] if limit is not None else [])
        if limit is not None:
            ax.axvline(limit, color="tab:red", ls="--", lw=1, gid=f"{LIMIT_GID}:{flag.split()[0]}",
                       label=f"{flag} {limit:g}")
        if limits.min_accuracy is not None:
            ax.axhline(limits.min_accuracy, color="tab:orange", ls="--", lw=1, gid=f"{LIMIT_GID}:--min-accuracy",
                       label=f"--min-accuracy {limits.min_accuracy:g}")
        if any(not x for x in xs):
            ax.text(0.01, 0.01, f"{sum(1 for x in xs if not x)} candidate(s) not measured here", fontsize=6,
                    transform=ax.transAxes, color="0.4")
        ax.set_xscale("log")
        if present:
            ax.set_xlim(min(present) / 1.8, max(present) * 1.8)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("validation accuracy (95 % interval)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("edgeft search: accuracy of the shipped file, else stage 2, else stage 1; grey = breaks a limit; "
                 "red ring = chosen; x = not trained" + ("; marker area = file size, square = host-timed"
                                                        if panels[0][0] == "latency" else ""), fontsize=8)
    fig.tight_layout()
    return fig


def pareto_png(path: Path, table: list[dict], limits: Limits, flash: bool = False) -> bool:
    """pareto.png (`pareto_figure`), written atomically; False when there is nothing to draw."""
    from edgeft.train.pictures import save_fig

    fig = pareto_figure(table, limits, flash)
    if fig is None:
        return False
    save_fig(fig, path, dpi=120)
    return True


def write_results(out: Path, s: dict, rows: list[Row], decision: dict | None, limits: Limits) -> dict:
    from edgeft.search.choose import RULE

    table = [r.as_dict() for r in rows]
    table.sort(key=lambda r: (not r["chosen"], -(r["shipped_val_accuracy"] or -1), -(r["stage2_val_accuracy"] or -1),
                              -(r["stage1_val_accuracy"] or -1), r["id"]))
    if decision is None:
        decision = {"chosen": None, "rule": RULE, "comparisons": [], "nearest": nearest(rows)}
    result = {"folder": s["folder"], "target": s["target"], "limits": s["limits"], "threads": s["threads"],
              "skipped": s.get("skipped", []), "decision": decision, "candidates": table}
    rundir.write_json(out / "results.json", result)
    rundir.write_csv(out / "results.csv", table, COLUMNS)
    plot = pareto_png(out / "pareto.png", table, limits, flash=s["target"].get("runtime") == "tflm")
    rundir.write_text(out / "report.md", markdown(s, table, decision, limits, plot))
    return result
