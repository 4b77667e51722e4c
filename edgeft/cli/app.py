"""Command line: parse flags into a config and make one library call. Nothing else lives here."""
from __future__ import annotations

import argparse
import sys

from edgeft.cli.flags import _config_keys, add_config_flags, values_from_args
from edgeft.cli.parsing import MESSAGE_LIMIT, Parser
from edgeft.core.errors import OperationFailed, ParityError, UserError, os_error_text, os_remedy


# ------------------------------------------------------------------ commands
FINETUNE_SECTIONS = ("data", "model", "train", "qat")


def cmd_finetune(args) -> int:
    from edgeft.pipeline.preflight import check_finetune, finished_run, say_finished

    if args.resume and (done := finished_run(args.out)) is not None:   # before any check writes a probe file
        say_finished(done)
        return 0
    values = None if args.resume else values_from_args(args, _config_keys(FINETUNE_SECTIONS))
    check_finetune(values, args.out, args.overwrite, args.resume)   # before TensorFlow loads
    from edgeft.pipeline.orchestrator import finetune

    if args.resume:
        finetune(out=args.out, resume=True)
    else:
        finetune(values, out=args.out, overwrite=args.overwrite)
    return 0


class _Version(argparse.Action):
    """--version on one line (argparse's own action wraps it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit(0)


def version_line() -> str:
    """edgeft's version and the stack it runs on (read from package metadata: no TensorFlow import)."""
    from importlib import metadata

    from edgeft import __version__

    stack = []
    for name in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnxruntime", "ai-edge-litert"):
        try:
            stack.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            stack.append(f"{name} missing")
    return f"edgeft {__version__} ({', '.join(stack)})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="edgeft", description="Fine-tune VGG16 / MobileNet on an image folder and ship "
               "verified TFLite / ONNX models to edge devices.", epilog="`edgeft COMMAND --help` lists a command's "
               "flags, the common ones first.")
    p.add_argument("--version", action=_Version, help="print the versions of edgeft and its stack, then exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser, title="commands", metavar="COMMAND")

    ft = sub.add_parser("finetune", help="two-stage fine-tuning on an image folder (no folder: offline demo)",
                        description="Stage 1 trains a new head on the frozen backbone; stage 2 unfreezes "
                        "the top of the backbone at a small learning rate. Flags override --config.")
    ft.add_argument("folder", nargs="?", default=argparse.SUPPRESS,
                    help="image folder with one sub-folder per class (omit for the offline demo)")
    ft.add_argument("--config", help="YAML file with the same keys as the flags (a run's config.yaml works)")
    ft.add_argument("--out", help="run directory (default: runs/<folder>_<backbone>)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing run directory (only one edgeft "
                    "made that holds nothing else; never a data folder, the cache, the working directory or HOME)")
    ft.add_argument("--resume", action="store_true", help="continue the killed run in --out from its last epoch")
    add_config_flags(ft, FINETUNE_SECTIONS)
    ft.set_defaults(func=cmd_finetune)

    for register in _extra_commands():
        register(sub)
    for choice in sub._choices_actions:   # noqa: SLF001 - argparse keeps each command's one-line help here
        command = sub.choices[choice.dest]
        command.description = command.description or choice.help[:1].upper() + choice.help[1:] + "."
        g = command.add_mutually_exclusive_group()
        g.add_argument("--quiet", action="store_true", help="no progress bars, progress or epoch lines (results, "
                       "warnings and errors are still printed; all of it is in the run's logs/edgeft.log)")
        g.add_argument("--verbose", action="store_true", help="also show debug lines and what TensorFlow, the "
                       "converters and other libraries log (kept off the console otherwise)")
    return p


def _extra_commands():
    """Sub-commands defined next to the code they call (qat, export, parity, evaluate, ...)."""
    from edgeft.cli import deploy as cli_deploy
    from edgeft.cli import search as cli_search
    return cli_deploy.COMMANDS + cli_search.COMMANDS


def _one_line(e: Exception) -> str:
    """The message on one line, at most MESSAGE_LIMIT characters: a backstop for a value quoted whole."""
    from edgeft.device import clip

    return clip(" ".join(str(e).split("\n")), MESSAGE_LIMIT)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:   # bare `edgeft`: what it can do
        parser.print_help()
        return 0
    _absolute_cache_root()
    from edgeft.core import logs

    restore = logs.console(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return _call(args)
    finally:
        restore()


def _absolute_cache_root() -> None:
    """A relative EDGEFT_CACHE resolved once, at start, against the working directory the command
    was started in: every path made under it (a demo run's folder, recorded in the run) is then
    absolute, and the search's workers, started elsewhere, inherit the same cache."""
    import os

    root = os.environ.get("EDGEFT_CACHE")
    if root and not os.path.isabs(root):
        os.environ["EDGEFT_CACHE"] = os.path.abspath(root)


def _call(args) -> int:
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"edgeft: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"edgeft: parity FAILED: {e.short or e}", file=sys.stderr)   # the whole text: parity.md, the log
        return 1
    except OperationFailed as e:
        print(f"edgeft: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeft: interrupted", file=sys.stderr)
        return 130
    except OSError as e:   # backstop: a write or read no handler above named (each known case has its own)
        print(f"edgeft: error: {os_error_text(e)}: {os_remedy(e)}", file=sys.stderr)
        return 1
    except Exception as e:   # a corrupt image-cache row found inside tf.data arrives wrapped in a TF error
        import re

        found = re.search(r"image cache \S+ is corrupt[^\n]*", str(e))
        if not found:
            raise
        print(f"edgeft: error: {found.group(0)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
