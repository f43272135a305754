"""The one error path of the command lines (`python -m train`, `python -m ttt_jax.memory`).

A user error is a `ValueError` raised by the project's own code (validation that names the
field, the value and the constraint): it becomes one line on stderr, `error: <message>`, with
the flag that sets the field when the message names a config field and not a flag, and exit
code `EXIT_USAGE` (2, argparse's and tyro's own code for a bad flag). No traceback. A
`ValueError` raised inside a library (jax, numpy, ...) is a bug and keeps its traceback.
`read_json` reads a JSON file the user names (a run's or a checkpoint's `config.json`) with
such errors.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping

EXIT_USAGE = 2

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_FIELD = re.compile(r"\b([A-Z][A-Za-z]*(?:Config|Spec))\.([a-z_][a-z0-9_.]*)")


def raised_in(err: BaseException, roots: Iterable[str]) -> bool:
    """Whether the innermost frame of `err`'s traceback is in a file under one of `roots`."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return any(filename.startswith(os.path.join(os.path.abspath(r), "")) for r in roots)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def with_flags(message: str, fields: Mapping[str, str]) -> str:
    """`message` plus `(flag, ...)` for the config fields it names that have a flag.

    `fields` maps a class prefix to a flag prefix (`"OptimConfig.": "--optim."`: the message's
    `OptimConfig.b1` gives `--optim.b1`), or a bare field name to its flag (`"num_heads":
    "--heads"`, matched as a whole word). A message that names a flag already is kept as is.
    """
    if re.search(r"(^|[\s(])--[a-z]", message):
        return message
    flags = []
    for match in _FIELD.finditer(message):
        prefix = f"{match.group(1)}."
        if prefix in fields:
            flags.append(fields[prefix] + match.group(2).rstrip(".").replace("_", "-"))
    for name, flag in fields.items():
        if "." not in name and re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", message):
            flags.append(flag)
    flags = list(dict.fromkeys(flags))
    return f"{message} ({', '.join(flags)})" if flags else message


def read_json(file: str, missing: str) -> object:
    """The JSON value in `file`, or a user error: the message `missing` where the file does not
    exist, `<file> cannot be read (<error type>: <error>)` where it cannot be read or parsed."""
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(missing) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} cannot be read ({type(err).__name__}: {err})") from None


def run_cli(
    main: Callable[[], int | None],
    *,
    fields: Mapping[str, str] | None = None,
    roots: Iterable[str] = (_PACKAGE,),
    codes: Mapping[type, int] | None = None,
) -> int:
    """Runs `main()` and returns its exit code; user errors print one line (module docstring).

    Args:
      main: the command; returns its exit code (None: 0).
      fields: config field -> flag (see `with_flags`).
      roots: directories whose code raises user errors (default: this package).
      codes: other exception types that are user errors, with their exit codes (raised
        anywhere; their message is printed the same way).
    """
    try:
        return main() or 0
    except Exception as err:
        code = next((c for t, c in (codes or {}).items() if isinstance(err, t)), None)
        if code is None:
            if not (isinstance(err, ValueError) and raised_in(err, roots)):
                raise
            code = EXIT_USAGE
        print(f"error: {with_flags(one_line(err), fields or {})}", file=sys.stderr)
        return code
