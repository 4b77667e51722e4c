#!/usr/bin/env python3
"""Turns a checkout of edgeft's FLAT layout (edgeft/*.py) into sub-packages by stage (issue 18).

    python tools/relayout.py            # in the repository root, on a tree in the flat layout
    python tools/relayout.py --dry-run  # only checks that every module has a row in TABLE

Re-runnable on any flat checkout (it is meant to be run once, on main after the branches that
still change the flat files have been merged): it

1. refuses to run on a tree that is not flat (any target package exists) and stops, naming the
   module, when edgeft/ holds a module TABLE has no row for (add one line, run again);
2. `git mv`s every module to its sub-package and writes each sub-package's `__init__.py` (two
   lines: what lives there, what it may import);
3. rewrites every import in edgeft/, tests/ and tools/ by TABLE: absolute (`edgeft.x`, `from
   edgeft import x`), relative (`from .x import`, `from . import x`), function-level ones, and
   every `edgeft.x` in a string or comment (`python -m edgeft.x`, monkeypatch / importlib / mock
   targets, docstrings); `edgeft/x.py` paths too, in code and in docs/ and README.md;
4. applies the hand-written parts that are not mechanical (see HAND_EDITS below and the files
   under tools/relayout_files/, written for the new layout): the pipeline orchestrator, the
   formats table without its runners, the import-linter contracts and their tests.

Nothing is committed: review `git status` / `git diff --stat -M`, run the checks the script
prints at the end, then commit.
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

# ------------------------------------------------------------------ the table
# old module (edgeft/<old>.py) -> new dotted path under edgeft. One line a module.
TABLE = {
    # core/: the TF-free ground
    "errors": "core.errors",
    "config": "core.config",
    "registry": "core.registry",
    "rundir": "core.rundir",
    "progress": "core.progress",
    "stats": "core.stats",
    "tiers": "core.tiers",
    "floor": "core.floor",              # the gate's floor (tiers' measurement; the int8 choice uses it too)
    "formats": "core.formats",          # the formats table, without its runners (verify/runners.py)
    "lock": "core.lock",
    "markdown": "core.markdown",
    # data/
    "images": "data.images",
    "cache": "data.cache",
    "data": "data.datasets",
    "demo": "data.demo",
    "demo_run": "data.demo_run",
    # nn/: the model, what a .keras may name, the runners of a model file
    "model": "nn.model",
    "keras_config": "nn.keras_config",
    "runtime": "nn.runtime",
    # train/
    "training": "train.stages",
    "callbacks": "train.callbacks",
    "distribute": "train.distribute",
    "report": "train.report",
    # export/: converters and what ships beside the files (no decisions)
    "convert": "export.keras2tflite",
    "onnx_export": "export.keras2onnx",
    "tflite_metadata": "export.tflite_metadata",
    "tflm": "export.tflm",
    "golden": "export.golden",
    "manifest": "export.manifest",
    # quantize/
    "qat": "quantize.qat",
    "qat_configs": "quantize.qat_configs",
    "int8_choice": "quantize.int8_choice",
    # verify/
    "parity": "verify.parity",
    "clients": "verify.clients",
    "evaluate": "verify.evaluate",
    "bench": "verify.bench",
    # pipeline/: orchestration
    "export": "pipeline.exporter",
    # cli/
    "cli": "cli.app",
    "cli_flags": "cli.flags",
    "cli_deploy": "cli.deploy",
}
# modules that stay where they are: the package files, the device contract (tools/edgeft_device.py
# links to it), the one Keras import, the custom layer (every saved model.keras records
# `edgeft.layers` as its module, and README documents `import edgeft.layers`), the Run handle
STAY = {"__init__", "__main__", "device", "_keras", "layers", "run"}

# a name that moved to another module than its module's (old module, name) -> new module
SYMBOL_MOVES = {
    ("formats", "open_format_runner"): "verify.runners",
    ("training", "finetune"): "pipeline.orchestrator",
}

# a moved name read as an attribute of its old module (`training.finetune(...)` after `from edgeft
# import training`): rewritten to this expression; any other moved name read that way stops the script
ATTRIBUTE_MOVES = {("training", "finetune"): "edgeft.finetune"}

# sub-packages, top to bottom: the layers contract's order; each __init__.py's two lines
PACKAGES = {
    "cli": ("Command-line parsing: flags and --config -> one EdgeftConfig -> one library call.",
            "The top: may import every package below; nothing imports it but edgeft.__main__."),
    "pipeline": ("The orchestrators: finetune (train -> optional QAT -> reports) and the gated export (build -> gate -> publish).",
                 "May import every stage package below; no stage imports this one, so no stage calls the next."),
    "verify": ("Every exported file run and judged: the parity gate, the client matrix, test-split evaluation, the benchmark.",
               "May import quantize, export, train, edgeft.run, nn, data, core; never pipeline or cli."),
    "quantize": ("Quantization-aware training, its quantize configs, and the int8 choice (PTQ vs QAT, judged as the gate judges).",
                 "May import export (the converters), train, edgeft.run, nn, data, core; never verify, pipeline or cli."),
    "export": ("Converters from a Keras model to file bytes (TFLite, ONNX, metadata), TFLite Micro sources, golden vectors, the manifest.",
               "May import train, edgeft.run, nn, data, core: no decisions here (quantize chooses, verify gates, pipeline publishes)."),
    "train": ("Stage 1 (head on frozen features) and stage 2 (top layers unfrozen), their callbacks, distribution, report.md.",
              "May import edgeft.run, nn, data, core; never a later stage (the pipeline runs QAT after training)."),
    # edgeft.run (a module, not a package) sits here: the Run handle stages take
    "nn": ("The one flat Keras model (backbone + head, edgeft.layers.Preprocess inside), what a .keras may name, the runners of model files.",
           "May import data, core, edgeft.layers, edgeft._keras and edgeft.device; nothing above."),
    "data": ("Image folder -> decoded on-disk image cache -> splits -> tf.data pipelines; the offline demo's folder.",
             "May import core, edgeft.device and edgeft._keras (TensorFlow only inside the tf.data functions)."),
    "core": ("The TF-free ground: errors, config, registry, run-directory files, progress, statistics, parity tiers and floor, formats table, lock, markdown.",
             "Imports only core and edgeft.device, never TensorFlow (both are import-linter contracts in pyproject.toml)."),
}
INIT_EXTRA = {   # installs made before the sub-packages run `edgeft = "edgeft.cli:main"` until reinstalled
    "cli": "from edgeft.cli.app import main  # noqa: F401 - the console script of installs made before the sub-packages\n"}
LAYERS = ["cli", "pipeline", "verify", "quantize", "export", "train", "run", "nn", "data", "core"]   # "run" is edgeft/run.py
TF_FREE = ["edgeft.core", "edgeft.device"]
TENSORFLOW = ["tensorflow", "tf_keras", "tensorflow_model_optimization"]

REWRITE_DIRS = ("edgeft", "tests", "tools")
DOC_FILES = ("README.md", "docs/*.md", "models/*.md", ".ci/run")
SKIP = {"tools/relayout.py"}
HERE = Path(__file__).resolve().parent
FILES = HERE / "relayout_files"     # new files, written for the new layout, copied to the same path


class Stop(Exception):
    pass


# ------------------------------------------------------------------ checks
def check_tree(root: Path) -> list[str]:
    pkg = root / "edgeft"
    if not (pkg / "__init__.py").is_file():
        raise Stop(f"{pkg} is not edgeft's package folder: run this in the repository root")
    done = [p for p in PACKAGES if (pkg / p).exists()]
    if done:
        raise Stop(f"edgeft/{done[0]}/ exists: this tree is not in the flat layout (already relaid out?); "
                   "start again from a flat checkout")
    modules = sorted(p.stem for p in pkg.glob("*.py"))
    unknown = [m for m in modules if m not in TABLE and m not in STAY]
    if unknown:
        raise Stop("no row in tools/relayout.py TABLE for " + ", ".join(f"edgeft/{m}.py" for m in unknown)
                   + ": add one line per module (old name -> new dotted path), then run again")
    folders = sorted(p.name for p in pkg.iterdir() if p.is_dir() and p.name not in ("__pycache__", "assets"))
    if folders:
        raise Stop(f"edgeft/ holds folders the table does not know: {', '.join(folders)}")
    missing = [m for m in TABLE if m not in modules]
    if missing:
        print(f"relayout: note: table rows with no module in this tree (skipped): {', '.join(missing)}")
    return [m for m in modules if m in TABLE]


# ------------------------------------------------------------------ rewriting
def _token_re(names) -> re.Pattern:
    alt = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.compile(rf"(?<![\w.])edgeft\.({alt})(?![\w])(?:\.(\w+))?")


def rewrite_tokens(text: str, table: dict) -> str:
    """Every `edgeft.<old>` (and `edgeft.<old>.<name>` of a moved name) in code, strings and
    comments; `edgeft/<old>.py` paths. One pass: nothing is rewritten twice."""
    def dotted(m):
        old, attr = m.group(1), m.group(2)
        if attr is not None and (old, attr) in SYMBOL_MOVES:
            return f"edgeft.{SYMBOL_MOVES[old, attr]}.{attr}"
        return f"edgeft.{table[old]}" + (f".{attr}" if attr is not None else "")

    text = _token_re(table).sub(dotted, text)
    alt = "|".join(sorted(map(re.escape, table), key=len, reverse=True))
    text = re.sub(rf"(?<![\w/])edgeft/({alt})\.py\b", lambda m: f"edgeft/{table[m.group(1)].replace('.', '/')}.py", text)
    # a bare `qat.py` in prose: the module's path inside edgeft/ (quantize/qat.py)
    return re.sub(rf"(?<![\w/.-])({alt})\.py\b", lambda m: f"{table[m.group(1)].replace('.', '/')}.py", text)


def _comment(line: str) -> str:
    m = re.search(r"\s+#.*$", line)
    return m.group(0) if m else ""


def _names(aliases) -> list[tuple[str, str | None]]:
    return [(a.name, a.asname) for a in aliases]


def _fmt_names(names) -> str:
    return ", ".join(n if a is None or a == n else f"{n} as {a}" for n, a in names)


def _import_lines(indent: str, module: str, names, comment: str) -> list[str]:
    line = f"{indent}from {module} import {_fmt_names(names)}"
    if len(line) > 115 and len(names) > 1:
        inner = f",\n{indent}    ".join(_fmt_names([n]) for n in names)
        line = f"{indent}from {module} import (\n{indent}    {inner},\n{indent})"
    return [line + comment]


def rewrite_imports(text: str, table: dict, in_package_root: bool) -> str:
    """Relative imports become absolute ones by the table; `from edgeft import <module>` and
    imports of a moved name are split by where each name now lives. Runs on the text the token
    pass made (line numbers unchanged), from the AST of that same text."""
    tree = ast.parse(text)
    lines = text.split("\n")
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        indent = " " * node.col_offset
        last = lines[node.end_lineno - 1]
        comment = _comment(last) if "#" in last else ""
        if node.level > 1 or (node.level == 1 and not in_package_root):
            raise Stop(f"relative import at level {node.level} in a flat-layout file: {lines[node.lineno - 1].strip()}")
        if node.level == 1:
            mod = node.module
            old = mod.split(".")[0] if mod else None
        elif node.module and (node.module == "edgeft" or node.module.startswith("edgeft.")):
            mod = node.module[len("edgeft."):] if node.module != "edgeft" else None
            old = None   # already rewritten by the token pass; find its old name back
            if mod:
                back = {v: k for k, v in table.items()}
                old = back.get(mod, mod.split(".")[0])
        else:
            continue
        names = _names(node.names)
        out = []
        if mod is None:   # from . import a, b / from edgeft import a, b
            groups: dict[str, list] = {}
            for n, a in names:
                if n in table:
                    parent, _, leaf = table[n].rpartition(".")
                    groups.setdefault(f"edgeft.{parent}" if parent else "edgeft", []).append((leaf, a or n))
                else:
                    groups.setdefault("edgeft", []).append((n, a))
            for module, ns in groups.items():
                out += _import_lines(indent, module, ns, comment)
                comment = ""
        else:
            if node.level == 1:
                new = f"edgeft.{table[old]}" if old in table else f"edgeft.{mod}"
                if old in table and "." in mod:
                    raise Stop(f"relative import of a sub-module in a flat-layout file: {lines[node.lineno - 1].strip()}")
            else:
                new = node.module
            moved = [(n, a) for n, a in names if (old, n) in SYMBOL_MOVES]
            if not moved and node.level == 0:
                continue
            if not moved:   # only the head changes: keep the statement's own layout
                head = lines[node.lineno - 1]
                fixed = re.sub(rf"from\s+\.{re.escape(mod)}(\s+import)", rf"from {new}\1", head, count=1)
                if fixed == head:
                    raise Stop(f"cannot rewrite {head.strip()!r}")
                edits.append((node.lineno, node.lineno, [fixed]))
                continue
            kept = [(n, a) for n, a in names if (old, n) not in SYMBOL_MOVES]
            if kept:
                out += _import_lines(indent, new, kept, comment)
                comment = ""
            by_dest: dict[str, list] = {}
            for n, a in moved:
                by_dest.setdefault(f"edgeft.{SYMBOL_MOVES[old, n]}", []).append((n, a))
            for module, ns in by_dest.items():
                out += _import_lines(indent, module, ns, comment)
                comment = ""
        edits.append((node.lineno, node.end_lineno, out))
    for start, end, new_lines in sorted(edits, reverse=True):
        lines[start - 1:end] = new_lines
    return "\n".join(lines)


_EDGEFT_IMPORT = re.compile(r"^(?:from edgeft[\w.]* import [^()\\]*|import edgeft[\w.]*(?: as \w+)?)(?:\s+#.*)?$")


def sort_edgeft_imports(text: str) -> str:
    """Runs of one-line `from edgeft... import` statements at the top of a file (column 0), sorted
    by module, as they were before the rewrite changed their names."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if _EDGEFT_IMPORT.match(lines[i]):
            j = i
            while j < len(lines) and _EDGEFT_IMPORT.match(lines[j]):
                j += 1
            lines[i:j] = sorted(lines[i:j], key=lambda s: re.split(r"\s+import\s+|\s+as\s+", s.split(" ", 1)[1])[0])
            i = j
        else:
            i += 1
    return "\n".join(lines)


def rewrite_moved_attributes(text: str, original: str, path: Path) -> str:
    """`alias.name` where alias is an old module's local name and `name` moved (SYMBOL_MOVES)."""
    aliases = {}
    for node in ast.walk(ast.parse(original)):
        if isinstance(node, ast.ImportFrom) and (node.module == "edgeft" or (node.level == 1 and node.module is None)):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgeft.") and a.asname:
                    aliases[a.asname] = a.name[len("edgeft."):]
    used = False
    for local, old in aliases.items():
        for (mod, name), _ in SYMBOL_MOVES.items():
            if mod != old or not re.search(rf"(?<![\w.]){re.escape(local)}\.{name}\b", text):
                continue
            if (mod, name) not in ATTRIBUTE_MOVES:
                raise Stop(f"{path}: {local}.{name}: {name} moved to edgeft.{SYMBOL_MOVES[mod, name]}; "
                           "add it to ATTRIBUTE_MOVES or import it from there")
            text = re.sub(rf"(?<![\w.]){re.escape(local)}\.{name}\b", ATTRIBUTE_MOVES[mod, name], text)
            used = True
    if used and not re.search(r"^\s*import edgeft\s*$", text, re.M):
        tree = ast.parse(text)
        first = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                     and not (isinstance(n, ast.ImportFrom) and n.module == "__future__"))
        lines = text.split("\n")
        lines.insert(first.lineno - 1, "import edgeft")
        text = "\n".join(lines)
    return text


def deeper_file_paths(text: str) -> str:
    """A moved module sits one folder deeper: `Path(__file__)...parent.parent` gains one `.parent`."""
    return re.sub(r"(Path\(__file__\)(?:\.resolve\(\))?)((?:\.parent)+)", lambda m: m.group(1) + m.group(2) + ".parent",
                  text)


def rewrite_lazy_map(text: str, table: dict) -> str:
    """edgeft/__init__.py: the lazy map names modules relative to the package, in strings."""
    m = re.search(r"_LAZY = \{.*?\n\}|_LAZY = \{[^\n]*(?:\n[ \t]+[^\n]*)*\}", text, re.S)
    if not m:
        raise Stop("edgeft/__init__.py: no _LAZY map found")

    def entry(e):
        old, attr = e.group(1), e.group(2)
        new = SYMBOL_MOVES.get((old, attr), table.get(old, old))
        return f'("{new}", "{attr}")'

    lazy = re.sub(r'\("(\w+)", "(\w+)"\)', entry, m.group(0))
    return text[:m.start()] + lazy + text[m.end():]


# ------------------------------------------------------------------ hand-written edits
def _replace(path: Path, old: str, new: str, what: str, count: int = 1) -> None:
    text = path.read_text()
    n = text.count(old)
    if n != count:
        raise Stop(f"hand edit '{what}': expected {count} match(es) of this text in {path}, found {n}:\n{old}")
    path.write_text(text.replace(old, new))


def _cut_function(path: Path, name: str, what: str) -> str:
    """Removes the top-level function `name` (and the blank lines after it); returns its text."""
    text = path.read_text()
    tree = ast.parse(text)
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise Stop(f"hand edit '{what}': no function {name} in {path}")
    lines = text.split("\n")
    start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
    end = node.end_lineno
    while end < len(lines) and not lines[end].strip():
        end += 1
    cut = "\n".join(lines[start:end])
    path.write_text("\n".join(lines[:start] + lines[end:]))
    return cut


def hand_edits(root: Path) -> None:
    pkg = root / "edgeft"
    # 0. the converter module under its own name in the exporter (the mechanical pass kept `convert`)
    ex = pkg / "pipeline" / "exporter.py"
    _replace(ex, "from edgeft.export import keras2tflite as convert\n", "from edgeft.export import keras2tflite\n",
             "exporter imports keras2tflite")
    ex.write_text(sort_edgeft_imports(re.sub(r"\bconvert\.(tflite_\w+)\(", r"keras2tflite.\1(", ex.read_text())))
    # 1. the formats table keeps no runners: they need the TFLM and Keras runners, above the ground
    _cut_function(pkg / "core" / "formats.py", "open_format_runner", "formats without runners")
    _replace(pkg / "core" / "formats.py",
             "Shared by export (which builds each row), parity (which gates it) and bench (which times it);\n"
             "it imports nothing of theirs, so those stages never import one another.",
             "Shared by export (which builds each row), parity (which gates it) and bench (which times it);\n"
             "it imports nothing of theirs (the runner of each row is edgeft.verify.runners), so it stays in\n"
             "the TF-free ground and those stages never import one another.", "formats docstring")
    # 2. one orchestrator: training no longer runs QAT; it returns what the pipeline needs
    st = pkg / "train" / "stages.py"
    _replace(st, "def finetune(config: EdgeftConfig | dict | None = None, *, out: str | Path | None = None,\n"
                 "             overwrite: bool = False, resume: bool = False, **overrides) -> FinetuneResult:\n"
                 '    """Fine-tunes a backbone on an image folder; the Python API of `edgeft finetune`.',
             "def train(config: EdgeftConfig | dict | None = None, *, out: str | Path | None = None,\n"
             '          overwrite: bool = False, resume: bool = False, **overrides) -> "Trained":\n'
             '    """Stages 1 and 2 on an image folder: the model saved and evaluated, the reports not yet\n'
             "    written (`finish`, after QAT when asked). edgeft.finetune (edgeft.pipeline.orchestrator)\n"
             "    runs train -> qat -> finish.", "train() instead of finetune()")
    _replace(st, "def _run(cfg: EdgeftConfig, out, overwrite: bool, resume: bool, run: Path | None) -> FinetuneResult:",
             'def _run(cfg: EdgeftConfig, out, overwrite: bool, resume: bool, run: Path | None) -> "Trained":',
             "_run returns Trained")
    text = st.read_text()
    text = re.sub(r"(\ndef _finetune\([^)]*\)) -> FinetuneResult:", r'\1 -> "Trained":', text)   # issue 17's wrapper
    # issue 17's run lock (an ExitStack held by the chief for the whole job): it now stays held
    # until the orchestrator releases it, after QAT and the reports
    lock = re.search(r"\n    with ExitStack\(\) as locks:[^\n]*\n        return _train\(cfg, out, overwrite, resume, run, locks\)\n", text)
    if lock:
        text = (text[:lock.start()] + "\n    locks = ExitStack()   # the run directory's lock (edgeft.core.lock): held until Trained.release()\n"
                "    try:\n        return _train(cfg, out, overwrite, resume, run, locks)\n"
                "    except BaseException:\n        locks.close()\n        raise\n" + text[lock.end():])
        text = re.sub(r"(\ndef _train\([^)]*locks: ExitStack\)) -> FinetuneResult:", r'\1 -> "Trained":', text)
    elif "run_lock(" in text:
        raise Stop(f"hand edit 'QAT out of training': {st} takes a run lock in a way this script does not know; "
                   "make train() hand the lock to Trained(locks=...) by hand")
    m = re.search(r"\n    if cfg\.qat\.qat_epochs > 0:\n        from edgeft\.quantize\.qat import run_qat\n"
                  r"        metrics\[\"qat\"\] = run_qat\(Run\(wdir, cfg, splits=splits, folder=folder\), scope=scope\)\n", text)
    if not m:
        raise Stop(f"hand edit 'QAT out of training': the QAT call at the end of _run not found in {st}")
    ret = "Trained(run, wdir, cfg, splits, folder, scope, metrics, model" + (", locks" if lock else "") + ")"
    text = (text[:m.start()] + f"\n    return {ret}\n\n\n"
            'def finish(t: "Trained") -> FinetuneResult:\n'
            '    """After training (and QAT, when the pipeline ran it): the demo\'s transfer check,\n'
            '    metrics.json, report.md, the scope\'s scratch files."""\n'
            "    run, wdir, cfg, splits, scope, metrics, model = t.run, t.wdir, t.cfg, t.splits, t.scope, t.metrics, t.model\n"
            + text[m.end():])
    text = re.sub(r"\n[ \t]+\n(    return Trained\()", r"\n\n\1", text)
    anchor = "\n\n# ---------------------------------------------------------------- stage 1\n"
    if text.count(anchor) != 1:
        raise Stop(f"hand edit 'Trained': the stage 1 banner not found once in {st}")
    text = text.replace(anchor, '''


@dataclass
class Trained:
    """A run just trained, not yet finished: what QAT and `finish` take from training."""
    run: Path                  # the run directory
    wdir: Path                 # where this worker writes (the run directory on the chief)
    cfg: EdgeftConfig
    splits: Splits
    folder: str
    scope: Scope
    metrics: dict
    model: keras.Model
    locks: object = None       # an ExitStack holding the run directory's lock, when training took it

    def handle(self) -> Run:
        """The Run of the run just trained, its splits and data folder in hand."""
        return Run(self.wdir, self.cfg, splits=self.splits, folder=self.folder)

    def release(self) -> None:
        """Lets go of the run directory's lock (the orchestrator, once QAT and the reports are done)."""
        if self.locks is not None:
            self.locks.close()
''' + anchor, 1)
    st.write_text(text)


# device.py stays one file; its sections get an order a reader can follow and a banner each. Which
# section a top-level statement belongs to is read from the banner above it in the file as it is
# (so functions others added land where they put them); MOVE_TO names the few that change section.
DEVICE_SECTIONS = [   # (banner word in the flat file, title), in the new order
    ("images", "1. decode: image files -> uint8 RGB pixels at the model's size (the one decoder)"),
    ("quantization", "2. quantize: float pixels <-> the int8 / uint8 tensors of a quantized model"),
    ("labels", "3. labels: labels.txt beside the model, the TFLite file's archive, the ONNX metadata"),
    ("runners", "4. runners: LiteRT (TFLite) and ONNX Runtime behind one predict(batch) -> probabilities"),
    ("latency", "5. the timing rule: what one latency sample is, and the slow outliers left out"),
    ("manifest", "6. manifest: is this the file the export's gate passed (its sha256 in manifest.json)"),
    ("arguments", "7. command line: one-line errors, the sub-commands' flags"),
    ("bench", "8. bench: latency and accuracy of a model on a class folder or random inputs"),
    ("predict", "9. predict: top classes of images"),
    ("verify", "10. verify: a model against the export's golden vectors"),
    ("main", "11. main: the sub-command, its errors as one line"),
]
MOVE_TO = {"MANIFEST": "manifest", "check_manifest": "manifest", "manifest_files": "manifest",
           "entry_problem": "manifest", "file_sha256": "manifest", "print_predictions": "predict"}
_BANNER = re.compile(r"^# -{6,} ?(\w+)\s*$")


def _node_name(node) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def reorder_device(path: Path) -> None:
    """device.py's top-level statements regrouped by DEVICE_SECTIONS, each section under one banner.
    Statements that stay neighbours are copied as they are (comments and spacing kept)."""
    text = path.read_text()
    lines = text.split("\n")
    banners = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _BANNER.match(line))]
    known = {k for k, _ in DEVICE_SECTIONS}
    unknown = [name for _, name in banners if name not in known]
    if unknown or not banners:
        raise Stop(f"{path}: section banner(s) {unknown or 'none'} not in DEVICE_SECTIONS: add a row")
    first = banners[0][0]
    tree = ast.parse(text)
    body = [n for n in tree.body if n.lineno - 1 > first]
    if any(n.lineno - 1 < first < n.end_lineno for n in tree.body):
        raise Stop(f"{path}: a statement spans the first banner")
    # each statement with the comment lines right above it (not banners, not blank-separated code)
    blocks, prev_end = [], first + 1
    for n in body:
        start = (n.decorator_list[0].lineno if getattr(n, "decorator_list", None) else n.lineno) - 1
        top = start
        while top - 1 >= prev_end and lines[top - 1].startswith("#") and not _BANNER.match(lines[top - 1]):
            top -= 1
        section = [name for i, name in banners if i < start][-1]
        name = _node_name(n)
        blocks.append({"top": top, "end": n.end_lineno, "section": MOVE_TO.get(name, section), "name": name})
        prev_end = n.end_lineno
    # runs: neighbours in the file that stay in one section are copied as one slice
    order = {k: i for i, (k, _) in enumerate(DEVICE_SECTIONS)}
    out = ["\n".join(lines[:first]).rstrip("\n")]
    for key, title in DEVICE_SECTIONS:
        mine = [b for b in blocks if b["section"] == key]
        if not mine:
            continue
        out.append(f"\n\n# {'=' * 96}\n# {title}\n# {'=' * 96}\n")
        runs, cur = [], [mine[0]]
        for b in mine[1:]:
            if blocks.index(b) == blocks.index(cur[-1]) + 1:
                cur.append(b)
            else:
                runs.append(cur)
                cur = [b]
        runs.append(cur)
        for r in runs:
            chunk = "\n".join(line for line in lines[r[0]["top"]:r[-1]["end"]] if not _BANNER.match(line))
            out.append(chunk.strip("\n") + "\n\n")
    new = "\n".join(out).rstrip("\n") + "\n"
    new = re.sub(r"\n{4,}", "\n\n\n", new)
    ast.parse(new)
    before = sorted(ast.dump(n) for n in tree.body)
    after = sorted(ast.dump(n) for n in ast.parse(new).body)
    if before != after:
        raise Stop(f"{path}: reordering changed a statement (a bug in reorder_device)")
    del order
    path.write_text(new)


def copy_files(root: Path) -> list[str]:
    """tools/relayout_files/<path> -> <path> (new files, written for the new layout)."""
    made = []
    for src in sorted(FILES.rglob("*")):
        if src.is_file() and "__pycache__" not in src.parts:
            rel = src.relative_to(FILES)
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            made.append(str(rel))
    return made


def importlinter_config() -> str:
    layers = "\n".join(f'    "edgeft.{name}",' for name in LAYERS)
    sources = ", ".join(f'"{m}"' for m in TF_FREE)
    tf = ", ".join(f'"{m}"' for m in TENSORFLOW)
    inner = ", ".join(f'"edgeft.{p}"' for p in PACKAGES) + ', "edgeft.run", "edgeft._keras", "edgeft.layers"'
    return f'''
# The layer contract (tests/test_layout.py runs it): sub-packages by stage, imports point down only
# (function-level imports count); the device file and the ground stay free of TensorFlow.
[tool.importlinter]
root_package = "edgeft"
include_external_packages = true

[[tool.importlinter.contracts]]
id = "layers"
name = "edgeft's sub-packages import only the ones below them"
type = "layers"
layers = [
{layers}
]

[[tool.importlinter.contracts]]
id = "tf-free"
name = "the device file and the ground import no TensorFlow, Keras or tfmot"
type = "forbidden"
source_modules = [{sources}]
forbidden_modules = [{tf}]

[[tool.importlinter.contracts]]
id = "device-standalone"
name = "the device file imports nothing of edgeft's (a device runs it alone)"
type = "forbidden"
source_modules = ["edgeft.device"]
forbidden_modules = [{inner}]
'''


def rewrite_pyproject(root: Path, table: dict) -> None:
    p = root / "pyproject.toml"
    text = rewrite_tokens(p.read_text(), table)
    pkgs = ", ".join(f'"edgeft.{name}"' for name in reversed(list(PACKAGES)))
    new = f'packages = ["edgeft", {pkgs}]'
    text, n = re.subn(r'^packages = \["edgeft"\]$', new, text, flags=re.M)
    if n != 1:
        raise Stop('pyproject.toml: `packages = ["edgeft"]` not found under [tool.setuptools]')
    if "[tool.importlinter]" in text:
        raise Stop("pyproject.toml already has a [tool.importlinter] section")
    p.write_text(text.rstrip("\n") + "\n" + importlinter_config())


# ------------------------------------------------------------------ main
def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=".", help="repository root (default: the current directory)")
    ap.add_argument("--dry-run", action="store_true", help="check the tree against the table and stop")
    ap.add_argument("--allow-dirty", action="store_true", help="run on a work tree with uncommitted changes")
    ap.add_argument("--keep-device-order", action="store_true",
                    help="leave edgeft/device.py's sections in their order (default: reorder them, with banners)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        present = check_tree(root)
        if args.dry_run:
            print(f"relayout: {len(present)} modules to move, every one in the table; nothing changed")
            return 0
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        if dirty.strip() and not args.allow_dirty:
            raise Stop("the work tree has uncommitted changes: commit or stash them first (a stop half-way is "
                       "then undone by `git reset --hard && git clean -fd`)")
        table = {old: TABLE[old] for old in present}
        # 1. rewrite every file in place (flat paths), then move
        files = [p for d in REWRITE_DIRS for p in (root / d).rglob("*.py")
                 if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts
                 and str(p.relative_to(root)) not in SKIP and FILES not in p.parents]
        for p in files:
            text = p.read_text()
            new = rewrite_tokens(text, table)
            in_root = p.parent == root / "edgeft"
            new = sort_edgeft_imports(rewrite_imports(new, table, in_root))
            new = rewrite_moved_attributes(new, text, p)
            if in_root and p.stem in table:
                new = deeper_file_paths(new)
            if p == root / "edgeft" / "__init__.py":
                new = rewrite_lazy_map(new, table)
            if new != text:
                p.write_text(new)
        for pattern in DOC_FILES:
            for p in root.glob(pattern):
                text = p.read_text()
                new = rewrite_tokens(text, table)
                if new != text:
                    p.write_text(new)
        rewrite_pyproject(root, table)
        # 2. the sub-packages and the moves
        for name, (what, may) in PACKAGES.items():
            d = root / "edgeft" / name
            d.mkdir()
            (d / "__init__.py").write_text(f'"""{what}\n{may}\n"""\n' + INIT_EXTRA.get(name, ""))
        for old in present:
            dest = root / "edgeft" / (TABLE[old].replace(".", "/") + ".py")
            git(root, "mv", f"edgeft/{old}.py", str(dest.relative_to(root)))
        git(root, "add", *[f"edgeft/{name}/__init__.py" for name in PACKAGES])
        # 3. the hand-written parts
        hand_edits(root)
        made = copy_files(root)
        if made:
            git(root, "add", *made)
        if not args.keep_device_order:   # last: device.py is ordered and bannered, nothing else changes in it
            reorder_device(root / "edgeft" / "device.py")
    except Stop as e:
        print(f"relayout: stopped: {e}", file=sys.stderr)
        if not args.dry_run and (root / "edgeft" / "core").exists():
            print("relayout: the tree is half-way: `git reset --hard && git clean -fd` returns it to the last commit",
                  file=sys.stderr)
        return 2
    print(f"relayout: {len(present)} modules moved into {len(PACKAGES)} sub-packages; imports rewritten; "
          f"{len(made)} new file(s) from tools/relayout_files/")
    print("next: lint-imports && python -c 'import edgeft; edgeft.finetune' && python -m edgeft --help && "
          "python -m pytest -m 'not slow' -q   (then review `git status`, commit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
