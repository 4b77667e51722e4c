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
           "latency_measured", "trained_size_kb", "trained_latency_p50_ms", "trained_latency_p95_ms", "arena_kb",
           "flash_kb", "ram_mb", "stage1_val_accuracy", "stage2_val_accuracy", "shipped_val_accuracy",
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

    @classmethod
    def new(cls, cand: dict, phase1: dict) -> "Row":
        return cls(cand["id"], cand, phase1)

    def record(self, what: str, value: float, attrs: dict) -> None:
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
                "trained_size_kb": kb(p3.get("size_bytes")), "trained_latency_p50_ms": lat3.get("p50"),
                "trained_latency_p95_ms": lat3.get("p95"), "arena_kb": kb(p3.get("arena_bytes", p1.get("arena_bytes"))),
                "flash_kb": kb(p3.get("flash_bytes", p1.get("flash_bytes"))),
                "ram_mb": p3.get("ram_mb", p1.get("ram_mb")), "stage1_val_accuracy": self.stage1,
                "stage2_val_accuracy": self.stage2, "shipped_val_accuracy": self.shipped.get("val_accuracy"),
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


def pareto_png(path: Path, table: list[dict], limits: Limits) -> bool:
    """Accuracy (best known: shipped, else stage 2, else stage 1) against latency, marker area by
    file size, the limits drawn, infeasible candidates grey, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stat = limits.latency_stat
    pts = []
    for r in table:
        lat = r.get(f"trained_latency_{stat}_ms") or r.get(f"latency_{stat}_ms")
        acc = next((r[k] for k in ("shipped_val_accuracy", "stage2_val_accuracy", "stage1_val_accuracy")
                    if r[k] is not None), None)
        pts.append((r, lat, acc))
    if not any(lat is not None for _, lat, _ in pts):
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sizes = [r["size_kb"] or 1 for r, _, _ in pts]
    scale = 400.0 / max(sizes)
    for (r, lat, acc), kb in zip(pts, sizes):
        if lat is None:
            continue
        infeasible = r["stopped_why"].startswith(("phase 1: breaks", "phase 3: its trained file breaks"))
        y = acc if acc is not None else 0.0
        ax.scatter([lat], [y], s=max(12.0, kb * scale), alpha=0.55,
                   color="0.75" if infeasible or acc is None else "tab:blue", edgecolors="k", linewidths=0.4)
        if r["chosen"]:
            ax.scatter([lat], [y], s=max(12.0, kb * scale) * 2.2, facecolors="none", edgecolors="tab:red", linewidths=2)
        ax.annotate(r["id"], (lat, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if limits.latency_ms is not None:
        ax.axvline(limits.latency_ms, color="tab:red", ls="--", lw=1, label=f"--max-latency-ms {limits.latency_ms:g}")
    if limits.min_accuracy is not None:
        ax.axhline(limits.min_accuracy, color="tab:orange", ls="--", lw=1, label=f"--min-accuracy {limits.min_accuracy:g}")
    ax.set_xlabel(f"latency {stat} (ms, batch 1)")
    ax.set_ylabel("validation accuracy (shipped file, else stage 2, else stage 1; 0: not trained)")
    ax.set_title("edgeft search: marker area = file size; grey = breaks a limit; red ring = chosen")
    if limits.latency_ms is not None or limits.min_accuracy is not None:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with rundir.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
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
    plot = pareto_png(out / "pareto.png", table, limits)
    rundir.write_text(out / "report.md", markdown(s, table, decision, limits, plot))
    return result
