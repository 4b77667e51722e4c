"""Config fields as command-line flags: shared by cli/app.py and cli/deploy.py (which cli/app.py imports)."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from edgeft.core.config import build_config, load_yaml, section_classes


def add_config_flags(p: argparse.ArgumentParser, sections: tuple[str, ...], exclude: frozenset = frozenset()) -> None:
    """One flag per config field of `sections`; help text comes from the field itself.

    Defaults are suppressed so the parsed namespace holds only what the user typed: those win over
    --config, which wins over the built-in defaults.
    """
    for sec in sections:
        g = p.add_argument_group(f"{sec} options")
        if sec == "data":
            add_legacy_flags(g)
        for f in fields(section_classes()[sec]):
            meta = f.metadata
            default = f.default if f.default is not MISSING else None
            if meta.get("positional") or f.name in exclude:
                continue
            flag = meta.get("flag", "--" + f.name.replace("_", "-"))
            kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": with_default(meta["help"], default)}
            if meta.get("auto"):
                kw["help"] = with_default(meta["help"], "auto")
            where = p if f.name in COMMON else g   # the parser's own group is listed first
            if "bool" in str(f.type):
                where.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                typ = float if "float" in str(f.type) else int if "int" in str(f.type) else str
                if meta.get("auto"):
                    typ = _or_auto(typ)
                choices = meta.get("choices")
                metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
                where.add_argument(flag, type=typ, choices=choices, metavar=metavar, **kw)


# the flags most runs set, listed with the command's own flags before the sections' (--help)
COMMON = frozenset({"backbone", "image_size", "recipe", "head_epochs", "finetune_epochs", "qat_epochs", "int8_source"})


def with_default(help_text: str, default) -> str:
    """The help with its default said once: not appended where the text already names it (and
    argparse's %-formatting escaped: `95 % interval`)."""
    text = help_text if "default" in help_text.lower() else f"{help_text} (default: {default})"
    return text.replace("%", "%%")


def _or_auto(typ):
    def parse(text: str):
        return "auto" if text.strip().lower() == "auto" else typ(text)
    parse.__name__ = typ.__name__   # argparse names the type in its error: "invalid float value"
    return parse


def add_legacy_flags(g) -> None:
    """`--augment` / `--no-augment` of earlier versions: the old augmentation (Keras' flip / rotate /
    zoom layers, stage 1 end to end) or none; config.upgrade_keys maps the key."""
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, dest="augment", default=argparse.SUPPRESS,
                   help="earlier versions' augmentation: --augment-policy flip-rotate-zoom --augment-online "
                        "(--no-augment: --augment-policy none)")


def values_from_args(args: argparse.Namespace, keys: set[str]) -> dict:
    """Flat config keys: --config file first, flags the user typed on top."""
    values = _flat(load_yaml(args.config)) if getattr(args, "config", None) else {}
    return {**values, **{k: v for k, v in vars(args).items() if k in keys}}


def config_from_args(args: argparse.Namespace, keys: set[str]):
    return build_config(values_from_args(args, keys))


def _flat(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if k in section_classes() and isinstance(v, dict):
            out.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            out[k.replace("-", "_")] = v
    return out


def _config_keys(sections) -> set[str]:
    keys = {f.name for s in sections for f in fields(section_classes()[s])}
    return keys | ({"augment"} if "data" in sections else set())
