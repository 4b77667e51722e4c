"""The argument parser every edgeft command uses: no abbreviations, one-line errors with "did you
mean", comma-separated lists, and old flag names kept for a round with one deprecation line."""
from __future__ import annotations

import argparse
import difflib
import re
import sys

__all__ = ["Parser", "HelpFormatter", "ListAction", "Renamed", "suggestion", "MESSAGE_LIMIT"]

MESSAGE_LIMIT = 800   # characters of one error line (values inside are capped at 200 where they are quoted)


class HelpFormatter(argparse.HelpFormatter):
    """Flag help with its default said once: `(default: X)` is appended by flags.py where the help
    does not already name it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def suggestion(word: str, candidates) -> str:
    """` (did you mean --backbone?)`, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """One line on stderr and exit 2 for any parsing error (argparse's default prints the usage
    first); no abbreviations (`--backbon` is not `--backbone`); a close name suggested for an
    unknown flag, command or choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        from edgeft.device import clip

        message = " ".join(str(message).split())
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            message += suggestion(found.group(1), re.findall(r"'([^']*)'", found.group(2)))
        self.exit(2, f"{self.prog}: error: {clip(message, MESSAGE_LIMIT)}\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        for positional, lists in getattr(self, "rescues", ()):
            _rescue(self, ns, positional, lists)
        for key in [k for k in vars(ns) if k.startswith("_pending_")]:   # a list's last value, no positional to take it
            action = next(a for a in self._actions if a.dest == key.removeprefix("_pending_"))   # noqa: SLF001
            try:
                action.split([vars(ns).pop(key)])
            except argparse.ArgumentError as e:
                self.error(str(e))
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(ns)
            flags = [a for a in extras if a.startswith("-")]
            hint = suggestion(flags[0].split("=", 1)[0], command._option_string_actions) if flags else ""
            where = f" for {command.prog}" if command is not self else ""
            self.error(f"unrecognized arguments{where}: {' '.join(extras)}{hint}")
        return ns

    def _command_parser(self, ns) -> "Parser":
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):   # noqa: SLF001 - argparse's own class
                return action.choices.get(getattr(ns, action.dest, None) or "", self)
        return self


def _rescue(parser: Parser, ns, positional: str, lists: tuple[str, ...]) -> None:
    """`export --tflite int8 RUN`: argparse's "+" is greedy, so a list flag takes the positional
    after it. A last value that is not one of the flag's members was set aside (ListAction): it is
    the positional when that is missing, else an invalid choice."""
    for dest in lists:
        pending = vars(ns).pop(f"_pending_{dest}", None)
        if pending is None:
            continue
        action = next(a for a in parser._actions if a.dest == dest)   # noqa: SLF001
        if getattr(ns, positional, None) is not None:
            try:
                action.split([pending])   # raises the value's own error
            except argparse.ArgumentError as e:
                parser.error(str(e))
        if not getattr(ns, dest):
            parser.error(str(argparse.ArgumentError(action, "expected at least one value")))
        setattr(ns, positional, pending)
    if getattr(ns, positional, None) is None:
        parser.error(f"the following arguments are required: {positional}")


class ListAction(argparse.Action):
    """A list flag: `--tflite float,int8` (comma-separated, the one list syntax); the space-separated
    form of earlier versions (`--tflite float int8`) still works. `members`: the allowed values;
    `item`: a type for each value."""

    def __init__(self, option_strings, dest, members=None, item=str, **kwargs):
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.members, self.item = members, item

    def invalid(self, text: str) -> str:
        return f"invalid choice: {text!r} (choose from {', '.join(repr(m) for m in self.members)})"   # Parser.error suggests

    def valid(self, text: str) -> bool:
        try:
            self.split([text])
            return True
        except argparse.ArgumentError:
            return False

    def split(self, tokens: list[str]) -> list:
        out = []
        for token in tokens:
            for text in filter(None, (t.strip() for t in str(token).split(","))):
                if self.members is not None and text not in self.members:
                    raise argparse.ArgumentError(self, self.invalid(text))
                try:
                    out.append(self.item(text))
                except (argparse.ArgumentTypeError, ValueError) as e:
                    raise argparse.ArgumentError(self, str(e) or f"invalid value: {text!r}") from None
        return out

    def __call__(self, parser, namespace, values, option_string=None):
        values = list(values)
        last = values[-1] if values else None
        if last is not None and "," not in last and not self.valid(last):
            setattr(namespace, f"_pending_{self.dest}", last)   # maybe the positional after the list (_rescue)
            values = values[:-1]
        items = self.split(values)
        if not items and f"_pending_{self.dest}" not in vars(namespace):
            raise argparse.ArgumentError(self, "expected at least one value")
        if len(values) > 1:   # the space-separated form of earlier versions
            print(f"edgeft: warning: space-separated {option_string} is deprecated and will be removed: use "
                  f"{option_string} {','.join(map(str, values))}", file=sys.stderr)
        setattr(namespace, self.dest, items)


class Renamed(argparse.Action):
    """An old flag name, kept for this round: its value (in its old unit, turned into the new one
    by `convert`) goes where the new flag's does, with one deprecation line on stderr."""

    def __init__(self, option_strings, dest, new: str, convert=None, unit_note: str = "", **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.convert, self.unit_note = new, convert, unit_note

    def __call__(self, parser, namespace, values, option_string=None):
        note = f" ({self.unit_note})" if self.unit_note else ""
        print(f"edgeft: warning: {option_string} is deprecated and will be removed: use {self.new}{note}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.convert(values) if self.convert else values)
