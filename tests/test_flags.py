"""Flags (issue 29, item 6): no abbreviations, "did you mean", one name / unit / list syntax per
concept, old names kept for a round with one deprecation line, bare `edgeft` lists the commands,
every command described in one line, defaults said once, common flags first. In-process through
`edgeft.cli.app.main(argv)`."""
from __future__ import annotations

import argparse

import pytest

from edgeft.cli import deploy
from edgeft.cli.app import build_parser, main


def _commands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, sub


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _visible_flags(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings
            if s.startswith("--") and a.help != argparse.SUPPRESS and s not in ("--help",)}


REQUIRED = {"evaluate": ["x"], "predict": ["x"], "search": ["--out", "o"]}   # what each needs besides


def test_no_flag_or_command_is_taken_by_abbreviation(capsys):
    p, sub = _commands()
    assert p.allow_abbrev is False
    for name, command in sub.choices.items():
        assert command.allow_abbrev is False, name
        longest = max(_visible_flags(command), key=len)
        with pytest.raises(SystemExit) as e:   # the longest flag less its last letter
            p.parse_args([name, longest[:-1], "1"] + REQUIRED.get(name, []))
        assert e.value.code == 2, (name, longest)
        assert f"did you mean {longest}" in capsys.readouterr().err, (name, longest)
    err = _refused(capsys, ["finetune", "--backbon", "nosuch"])
    assert "unrecognized arguments" in err and "did you mean --backbone?" in err


def test_the_device_script_takes_no_abbreviation_either(capsys):
    from edgeft import device

    with pytest.raises(SystemExit) as e:
        device.parse_args(["bench", "m.tflite", "--random", "--run", "3"])
    assert e.value.code == 2 and "--run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["fintune"], "did you mean finetune?"),
    (["finetune", "--backbnoe", "x"], "did you mean --backbone?"),
    (["export", "run", "--tfite", "int8"], "did you mean --tflite?"),
    (["export", "run", "--tflite", "int9"], "did you mean int8?"),
    (["benchmark", "run", "--thread", "2"], "did you mean --threads?"),
])
def test_an_unknown_flag_command_or_choice_gets_a_did_you_mean(capsys, argv, hint):
    assert hint in _refused(capsys, argv)


def test_bare_edgeft_lists_every_command_with_its_one_line_description(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    _, sub = _commands()
    for choice in sub._choices_actions:
        assert choice.dest in out and choice.help and "\n" not in choice.help
        command = sub.choices[choice.dest]
        assert command.description, f"edgeft {choice.dest} --help has no description"


def test_every_default_is_said_once_and_common_flags_come_first():
    _, sub = _commands()
    for name, command in sub.choices.items():
        assert "usage: edgeft" in command.format_help()   # every help renders (a bare % in a help breaks it)
        for action in command._actions:
            text = (action.help or "").lower()
            assert text.count("(default") <= 1, (name, action.option_strings, action.help)
    text = sub.choices["finetune"].format_help()
    text = text[text.index("\noptions:"):]   # the flags' entries, after the usage line
    assert text.index("--backbone") < text.index("data options:") < text.index("--augment-policy")
    assert text.index("--finetune-epochs") < text.index("data options:")


def _captured(monkeypatch, name: str) -> dict:
    seen = {}
    monkeypatch.setattr(deploy if name != "search" else __import__("edgeft.cli.search").cli.search,
                        f"cmd_{name}", lambda args: seen.update(vars(args)) or 0)
    return seen


def test_qat_takes_the_same_epochs_flag_as_finetune_and_keeps_the_old_name_a_round(monkeypatch, capsys):
    seen = _captured(monkeypatch, "qat")
    assert main(["qat", "run", "--qat-epochs", "3"]) == 0 and seen["epochs"] == 3
    assert capsys.readouterr().err == ""
    assert main(["qat", "run", "--epochs", "4"]) == 0 and seen["epochs"] == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgeft: warning: --epochs is deprecated and will be removed: use --qat-epochs"]
    help_text = _commands()[1].choices["qat"].format_help()
    assert help_text.count("--qat-epochs") == 2 and "--epochs" not in help_text.replace("--qat-epochs", "")


def test_benchmark_renamed_flags_keep_their_old_units(monkeypatch, capsys):
    seen = _captured(monkeypatch, "benchmark")
    assert main(["benchmark", "run", "--warmup-runs", "3", "--max-accuracy-drop", "2.5"]) == 0
    assert (seen["warmup"], seen["max_accuracy_drop"]) == (3, 2.5) and capsys.readouterr().err == ""
    assert main(["benchmark", "run", "--warmup", "4", "--max-drop", "0.02"]) == 0
    assert seen["warmup"] == 4 and seen["max_accuracy_drop"] == pytest.approx(2.0)   # a fraction, as points
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("deprecated" in line for line in err) and "points" in err[1]


def test_one_list_syntax_and_a_list_never_takes_the_run(monkeypatch):
    seen = _captured(monkeypatch, "export")
    for argv in (["export", "--tflite", "int8", "RUN"], ["export", "--tflite", "float,int8", "RUN"],
                 ["export", "--tflite", "float", "int8", "RUN"], ["export", "RUN", "--tflite", "float,int8"],
                 ["export", "--onnx", "int8", "--tflite", "float,int8", "RUN"]):
        assert main(argv) == 0, argv
        assert seen["run"] == "RUN" and seen["tflite"] in (["int8"], ["float", "int8"]), (argv, seen)
    seen = _captured(monkeypatch, "benchmark")
    for argv in (["benchmark", "--threads", "1", "2", "RUN"], ["benchmark", "--threads", "1,2", "RUN"]):
        assert main(argv) == 0 and seen["run"] == "RUN" and seen["threads"] == [1, 2], argv


def test_a_list_that_took_the_run_with_no_run_left_is_refused(capsys):
    assert "required: run" in _refused(capsys, ["export", "--check"])
    assert "invalid choice" in _refused(capsys, ["export", "RUN", "--tflite", "float", "bogus"])


def test_one_default_for_a_concept_across_commands():
    """Timed and untimed runs: the same names and defaults in benchmark, search and the device script."""
    from edgeft import device

    _, sub = _commands()
    bench, search = _visible_flags(sub.choices["benchmark"]), _visible_flags(sub.choices["search"])
    from edgeft.search.checks import DEFAULTS

    # search's flag defaults to what the search stored (None: typed values are told apart), else DEFAULTS
    assert bench["--runs"].default == DEFAULTS["runs"] == device.TIMED_RUNS
    assert search["--runs"].default in (None, device.TIMED_RUNS) and f"(default: {device.TIMED_RUNS})" in search["--runs"].help
    assert bench["--warmup-runs"].default == device.WARMUP_RUNS
    dev = device.parse_args(["bench", "m.tflite"])
    assert (dev.runs, dev.warmup) == (device.TIMED_RUNS, device.WARMUP_RUNS)
    assert device.parse_args(["bench", "m.tflite", "--threads", "1,2"]).threads == [1, 2]
    # no visible flag means two things: --warmup (finetune: a fraction of the steps) is not benchmark's
    assert "--warmup" not in bench and "--epochs" not in _visible_flags(sub.choices["qat"])
    assert "--max-drop" not in bench and "--max-accuracy-drop" in bench


def test_int8_recover_takes_its_three_values_and_mixed_is_not_a_flag(capsys):
    """Issue 30 item 4: --int8-recover auto|off|allow-mixed; model_mixed.* is made by recovery only."""
    assert "invalid choice" in _refused(capsys, ["export", "RUN", "--int8-recover", "mixed"])
    assert "invalid choice: 'mixed'" in _refused(capsys, ["export", "RUN", "--tflite", "mixed"])
