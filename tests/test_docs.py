"""Docs that parse (issue 29, item 7): every fenced `edgeft ...` and `python tools/...` command in
README.md and docs/*.md goes through the real parser (edgeft's, or the tool's `build_parser()`),
without running: an unknown flag, a bad choice, a missing positional or a deprecated name fails.
Fenced Python that calls edgeft is compiled and its config keys checked."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console", "")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", "$("}


def fenced(path: Path):
    """(language, first line number, body) of each fenced block."""
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        yield m.group(1).lower(), text[:m.start()].count("\n") + 2, m.group(2)


def _commands_in(line: str):
    """The argv of each edgeft / python tool command on one shell line (recursing into quoted
    `bash -c '...'` strings); a line that mentions edgeft but does not tokenize is an error."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError as e:
        raise AssertionError(f"cannot tokenize: {line!r} ({e})") from None
    group: list[str] = []
    for tok in tokens + [";"]:
        if tok not in OPERATORS:
            group.append(tok)
            continue
        while group and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", group[0]):   # VAR=value cmd
            group.pop(0)
        if group and Path(group[0]).name == "edgeft":
            yield ["edgeft", *group[1:]]
        elif len(group) > 1 and Path(group[0]).name in ("python", "python3") and group[1].endswith(".py"):
            yield group[1:]
        elif group and group[0] in ("python", "python3") and group[1:3] == ["-m", "edgeft"]:
            yield ["edgeft", *group[3:]]
        else:
            for tok in group:
                if re.search(r"(^|\s)edgeft\s", tok):
                    yield from _commands_in(tok)
        group = []


def documented_commands():
    out = []
    for path in DOCS:
        for lang, line_no, body in fenced(path):
            if lang not in SHELL:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip().startswith("$ "):
                    line = line.strip()[2:]
                for argv in _commands_in(line):
                    out.append((f"{path.relative_to(REPO)}:{line_no}", argv))
    return out


COMMANDS = documented_commands()


def _parse_edgeft(argv: list[str]) -> str:
    """'' when the real parser takes argv; else what it said."""
    from edgeft.cli.app import build_parser

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                return err.getvalue().strip() or f"exit {e.code}"
    return err.getvalue().strip()   # a deprecation line is a failure too


def test_the_docs_hold_commands_of_every_kind():
    kinds = {argv[0] if argv[0] == "edgeft" else Path(argv[0]).name for _, argv in COMMANDS}
    assert "edgeft" in kinds and "edgeft_device.py" in kinds and len(kinds) >= 5, kinds
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if c[1][0] == "edgeft"],
                         ids=[f"{w}:{' '.join(a[:2])}" for w, a in COMMANDS if a[0] == "edgeft"])
def test_every_documented_edgeft_command_parses(where, argv):
    problem = _parse_edgeft(argv[1:])
    assert not problem, f"{where}: `{shlex.join(argv)}`: {problem}"


TOOLS = '''
import contextlib, importlib.util, io, json, sys
from pathlib import Path
repo, commands = Path(sys.argv[1]), json.loads(sys.stdin.read())
sys.path.insert(0, str(repo))
results = []
for where, argv in commands:
    name = Path(argv[0]).name
    path = repo / "tools" / name
    err = io.StringIO()
    try:
        spec = importlib.util.spec_from_file_location(name[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)   # a tool runs only under __main__
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if name == "edgeft_device.py":
                mod.parse_args(argv[1:])   # its parse also reads the list syntax
            else:
                mod.build_parser().parse_args(argv[1:])
        results.append(err.getvalue().strip())
    except SystemExit as e:
        results.append((err.getvalue().strip() or f"exit {e.code}") if e.code else err.getvalue().strip())
    except Exception as e:
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps(results))
'''


def test_every_documented_tool_command_parses_with_the_tools_own_parser():
    """tools/*.py and the device script (`python edgeft_device.py` on a device is tools/edgeft_device.py),
    each imported in one child process (tools set variables of their own) and parsed, not run."""
    tools = [(w, a) for w, a in COMMANDS if a[0] != "edgeft"]
    assert tools
    r = subprocess.run([sys.executable, "-c", TOOLS, str(REPO)], input=json.dumps(tools), capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    problems = [f"{w}: `{shlex.join(a)}`: {p}" for (w, a), p in zip(tools, json.loads(r.stdout.splitlines()[-1])) if p]
    assert not problems, "\n".join(problems)


def test_the_parser_check_catches_what_it_should():
    """The check itself: an unknown flag, a bad choice, a missing positional, a deprecated name."""
    assert "unrecognized" in _parse_edgeft(["finetune", "--backbnoe", "x"])
    assert "invalid choice" in _parse_edgeft(["export", "RUN", "--tflite", "int9"])
    assert "required" in _parse_edgeft(["predict", "model.tflite"])
    assert "deprecated" in _parse_edgeft(["benchmark", "RUN", "--warmup", "5"])
    assert "deprecated" in _parse_edgeft(["export", "RUN", "--tflite", "float", "int8"])
    assert list(_commands_in("A=1 edgeft qat R && python3 tools/x.py --y # edgeft no")) == \
        [["edgeft", "qat", "R"], ["tools/x.py", "--y"]]
    assert list(_commands_in("srun bash -c 'X=\"1\" edgeft parity R'")) == [["edgeft", "parity", "R"]]


def _config_keys() -> set[str]:
    from dataclasses import fields

    from edgeft.core.config import section_classes

    sections = section_classes()
    return {f.name for cls in sections.values() for f in fields(cls)} | set(sections)


def _python_blocks():
    for path in DOCS:
        for lang, line_no, body in fenced(path):
            if lang in ("python", "py") and "edgeft" in body:
                yield f"{path.relative_to(REPO)}:{line_no}", body


def test_documented_python_compiles_and_uses_real_config_keys():
    keys, checked = _config_keys(), 0
    for where, body in _python_blocks():
        tree = ast.parse(compile(body, where, "exec", ast.PyCF_ONLY_AST))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                    in ("finetune", "build_config")):
                continue
            used = [k.arg for k in node.keywords if k.arg not in (None, "out", "overwrite", "resume", "base")]
            for arg in node.args[:1]:
                if isinstance(arg, ast.Dict):
                    used += [k.value for k in arg.keys if isinstance(k, ast.Constant)]
            unknown = sorted(set(used) - keys)
            assert not unknown, f"{where}: unknown config keys {unknown}"
            checked += 1
    assert checked >= 1


def test_the_docs_say_what_the_tool_does():
    """The statements issue 29 found wrong, against the code that decides them."""
    from edgeft.cli.app import build_parser
    from edgeft.data.demo_run import demo_settings

    text = {p.name: p.read_text(encoding="utf-8") for p in DOCS}
    every = "\n".join(text.values())
    # which int8 file ships: QAT only when clearly better (quantize/int8_choice.choose)
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    help_text = next(a.help for a in sub.choices["export"]._actions if "--int8-source" in a.option_strings)
    for where, said in [("--int8-source help", help_text), ("README.md", text["README.md"]),
                        ("quantization.md", text["quantization.md"])]:
        flat = " ".join(said.split())
        assert "clearly more accurate" in flat, where
        assert not re.search(r"(ships|ship) the (better|more accurate) one|more accurate one ships", flat), where
    # the demo folder lives under the cache, wherever EDGEFT_CACHE puts it
    assert "~/.cache/edgeft/demo_digits" not in every
    # the demo's own settings are documented, as the code has them
    demo = demo_settings()
    readme = " ".join(text["README.md"].split())
    for key in ("unfreeze", "finetune_epochs", "lr_finetune"):
        assert f"--{key.replace('_', '-')} {demo[key]}" in readme, key
    # mirroring: the photo policy mirrors too, not only --augment
    assert "only with `--augment`" not in " ".join(text["export.md"].split())
