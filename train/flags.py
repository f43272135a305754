"""A plain argparse command line over nested frozen dataclasses, for machines without tyro.

It accepts the flags tyro generates for the same dataclasses, so one command works with either:
`--section.field-name VALUE` (or `=VALUE`; underscores are accepted too), `--flag` /
`--section.no-flag` for booleans, several values for tuples (`--model.pattern a/b c/d`; a
tuple of pairs takes its pairs flattened), `None` for optional fields. Values are converted
by the field's annotation; the dataclasses' own validation then runs as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _fields(cls, default, prefix: str = ""):
    """`(dotted name, annotation, default)` of every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], value


def _scalar(tp, raw: str):
    """`raw` as one value of annotation `tp` (ValueError if it is none of its types)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is str):  # str last: it takes anything
            try:
                return _scalar(option, raw)
            except ValueError:
                continue
        raise ValueError(raw)
    if origin is typing.Literal:
        for option in args:
            if raw == str(option):
                return option
        raise ValueError(raw)
    if tp is type(None):
        if raw == "None":
            return None
        raise ValueError(raw)
    if tp is bool:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ValueError(raw)
    return tp(raw)  # int, float, str


def _convert(name: str, tp, raw):
    if isinstance(raw, bool):  # a store_true / store_false flag
        return raw
    try:
        if typing.get_origin(tp) is not tuple:
            return _scalar(tp, raw)
        item = typing.get_args(tp)[0]
        if typing.get_origin(item) is not tuple:
            return tuple(_scalar(item, r) for r in raw)
        parts = typing.get_args(item)
        if len(raw) % len(parts):
            raise ValueError(f"takes groups of {len(parts)} values")
        groups = [raw[i : i + len(parts)] for i in range(0, len(raw), len(parts))]
        return tuple(tuple(_scalar(t, r) for t, r in zip(parts, g, strict=True)) for g in groups)
    except ValueError as err:
        kind = getattr(tp, "__name__", None) if isinstance(tp, type) else None
        kind = kind or str(tp).replace("typing.", "")
        flag = name.replace("_", "-")
        raise ValueError(f"--{flag}: {raw!r} is not a valid {kind} ({err})") from None


def _replace(obj, values: dict):
    """`obj` with dotted-name overrides applied, rebuilding (and so validating) each level."""
    here = {k: v for k, v in values.items() if "." not in k}
    for section in {k.split(".", 1)[0] for k in values if "." in k}:
        inner = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        here[section] = _replace(getattr(obj, section), inner)
    return dataclasses.replace(obj, **here)


class FlagSyntaxError(Exception):
    """argparse rejected the command line itself (an unknown flag, a missing value)."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise FlagSyntaxError(message)


def parse_dataclass(cls, default, argv: list[str], description: str = "", *, exit_on_error=True):
    """An instance of `cls`: `default` with the overrides given in `argv` (module docstring).

    With `exit_on_error=False`, a command line argparse rejects raises `FlagSyntaxError`
    instead of printing usage and exiting (values are still checked: `ValueError`).
    """
    parser_cls = argparse.ArgumentParser if exit_on_error else _RaisingParser
    parser = parser_cls(description=description, allow_abbrev=False)
    leaves = {}
    for name, tp, value in _fields(cls, default):
        leaves[name] = tp
        spelled = {name.replace("_", "-"), name}
        if tp is bool:
            head, dot, last = name.rpartition(".")
            negated = {f"{head}{dot}no-{last.replace('_', '-')}", f"{head}{dot}no_{last}"}
            group = parser.add_mutually_exclusive_group()
            group.add_argument(*(f"--{s}" for s in sorted(spelled)), dest=name, default=None,
                               action="store_true", help=f"(default: {value})")  # fmt: skip
            group.add_argument(*(f"--{s}" for s in sorted(negated)), dest=name, default=None,
                               action="store_false", help=argparse.SUPPRESS)  # fmt: skip
            continue
        nargs = "+" if typing.get_origin(tp) is tuple else None
        parser.add_argument(*(f"--{s}" for s in sorted(spelled)), dest=name, default=None,
                            nargs=nargs, metavar="V", help=f"(default: {value!r})")  # fmt: skip
    parsed = vars(parser.parse_args(argv))
    values = {k: _convert(k, leaves[k], v) for k, v in parsed.items() if v is not None}
    return _replace(default, values)
