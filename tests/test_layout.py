"""The layout is a contract, not a hope: sub-packages by stage, imports pointing down only.

import-linter checks the contracts in pyproject.toml (function-level imports count); the tests
below also cover what it cannot see: the lazy map of edgeft/__init__.py, the `python -m
edgeft.<module>` child processes (client matrix, TFLite Micro probe) and the names tools/ and
tests/ import. None of them imports TensorFlow: they read sources (AST) and run the linter.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "edgeft"
ROOT_MODULES = {"__init__", "__main__", "device", "_keras", "layers", "run"}   # edgeft/*.py outside sub-packages


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree in `root` (its own pyproject.toml, its own edgeft on the path)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def contracts() -> dict:
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in cfg["contracts"]}


def require_import_linter() -> None:
    """import-linter is a dev dependency (pyproject.toml): without it the contract is unchecked, which
    is a failure, never a skip."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is not installed (pip install -e '.[dev]'): the layer contract cannot be checked")


def test_contracts_hold():
    require_import_linter()
    r = lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "Contracts: 4 kept" in r.stdout, r.stdout


def test_contracts_can_fail(tmp_path):
    """The same linter on a copy with an upward import (inside a function) in the ground and a
    TensorFlow import in the device file: the contracts must break, naming the line."""
    require_import_linter()
    copy = tmp_path / "repo"
    shutil.copytree(PKG, copy / "edgeft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "edgeft" / "core" / "stats.py", "a") as f:
        f.write("\n\ndef _upward():\n    from edgeft.verify import parity  # noqa: F401\n")
    with open(copy / "edgeft" / "device.py", "a") as f:
        f.write("\n\ndef _tf():\n    import tf_keras  # noqa: F401\n")
    r = lint(copy)
    assert r.returncode != 0, r.stdout
    assert "edgeft.core.stats -> edgeft.verify.parity" in r.stdout, r.stdout
    assert "edgeft.device -> tf_keras" in r.stdout, r.stdout
    # the layers and device contracts, and the search's TF-free one: its choice rule imports
    # core.stats, which now reaches TensorFlow through verify.parity
    assert "Contracts: 1 kept, 3 broken" in r.stdout, r.stdout


def test_contracts_name_every_subpackage_and_root_module():
    c = contracts()
    layers = c["layers"]["layers"]
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert {f"edgeft.{p}" for p in packages} | {"edgeft.run"} == set(layers), "a sub-package is missing from the layers contract"
    assert {p.stem for p in PKG.glob("*.py")} == ROOT_MODULES, "a module sits in edgeft/ outside every sub-package"
    assert set(c["tf-free"]["source_modules"]) == {"edgeft.core", "edgeft.device"}
    assert {"tensorflow", "tf_keras", "tensorflow_model_optimization"} <= set(c["tf-free"]["forbidden_modules"])
    for p in packages:
        doc = ast.get_docstring(ast.parse((PKG / p / "__init__.py").read_text()))
        assert doc and len(doc.strip().splitlines()) == 2, f"edgeft/{p}/__init__.py: two lines, what lives there and what it may import"


def _defines(module: str, name: str) -> bool:
    """Whether `module` (a dotted name under edgeft) defines or imports `name` at top level."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations and importlib.util.find_spec(f"{module}.{name}") is not None:
        return True   # a sub-module
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            if any(isinstance(e, ast.Name) and e.id == name for e in names):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def test_lazy_map_names_existing_modules():
    """`edgeft.finetune`, `edgeft.Run`...: resolved by importlib at first use, invisible to the linter."""
    sys.path.insert(0, str(REPO))
    try:
        import edgeft
        assert set(edgeft._LAZY) >= {"finetune", "load_model", "Run", "EdgeftConfig", "build_config"}
        for name, (mod, attr) in edgeft._LAZY.items():
            assert _defines(f"edgeft.{mod}", attr), f"edgeft.{name}: edgeft.{mod} has no {attr}"
    finally:
        sys.path.remove(str(REPO))


def _m_targets() -> list[tuple[Path, str]]:
    """Every `"-m", "edgeft...."` pair in edgeft's sources (the child processes)."""
    found = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple)):
                elts = node.elts
                for a, b in zip(elts, elts[1:]):
                    if (isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant)
                            and isinstance(b.value, str) and b.value.startswith("edgeft")):
                        found.append((path, b.value))
    return found


def test_python_m_children_name_runnable_modules():
    targets = _m_targets()
    assert {t for _, t in targets} >= {"edgeft.verify.clients", "edgeft.export.tflm"}, targets
    for path, target in targets:
        spec = importlib.util.find_spec(target)
        assert spec is not None and spec.origin, f"{path}: python -m {target}: no such module"
        if not spec.submodule_search_locations:
            assert 'if __name__ == "__main__"' in Path(spec.origin).read_text(), f"{target} has no __main__ block"


def _edgeft_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "edgeft":
            for a in node.names:
                yield node.lineno, node.module, a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "edgeft":
                    yield node.lineno, a.name, None


@pytest.mark.parametrize("folder", ["tools", "tests"])
def test_tools_and_tests_import_names_that_exist(folder):
    """Internal modules are no public API, so tools/ and tests/ follow every move: each name they
    import from edgeft must exist where they import it from."""
    sys.path.insert(0, str(REPO))
    try:
        bad = []
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, module, name in _edgeft_imports(path):
                if importlib.util.find_spec(module) is None:
                    bad.append(f"{path.name}:{line}: no module {module}")
                elif name is not None and module != "edgeft" and not _defines(module, name):
                    bad.append(f"{path.name}:{line}: {module} has no {name}")
        assert not bad, "\n".join(bad)
    finally:
        sys.path.remove(str(REPO))


def test_every_module_imports():
    """Every module of the package imports (in a fresh interpreter: a name a move left behind
    fails here even when no quick test runs that module)."""
    code = ("import importlib, pkgutil, edgeft\n"
            "names = [m.name for m in pkgutil.walk_packages(edgeft.__path__, 'edgeft.') if m.name != 'edgeft.__main__']\n"
            "for n in names:\n    importlib.import_module(n)\n"
            "print(len(names))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_USE_LEGACY_KERAS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) >= 50


def test_the_package_imports_only_the_device_files_contract():
    """edgeft/device.py's `__all__` is the contract the package imports (decoding, labels, runners,
    predict, timing, manifest): a name used from it that is not listed is a second, unmarked API."""
    contract = set(ast.literal_eval(next(
        node.value for node in ast.parse((PKG / "device.py").read_text()).body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets))))
    assert contract
    used: dict[str, set[str]] = {}
    for path in [p for p in PKG.rglob("*.py") if p != PKG / "device.py"] + sorted((REPO / "tools").glob("*.py")):
        if path.is_symlink():
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module == "edgeft" for a in node.names if a.name == "device"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "edgeft.device":
                names = {a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                names = {node.attr}
            else:
                continue
            for name in names - contract - {"__file__"}:
                used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert not used, f"names imported from edgeft.device outside its __all__: {used}"
