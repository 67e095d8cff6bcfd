"""What the administrator's and installer's commands share: one way to fail and one way to
read a time option."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

BAD_INPUT = 2
"""Exit status for input the command cannot use (fix it and run again)."""
REFUSED = 1
"""Exit status for a refusal by the state of things (a CA that exists, a running daemon)."""


def fail(problem: object, code: int = BAD_INPUT, *, prog: str = "qrgate") -> NoReturn:
    """Print ``prog: problem`` on stderr and exit with ``code``."""
    click.echo(f"{prog}: {problem}", err=True)
    sys.exit(code)


def time_option(text: str | None, name: str, now_s: int) -> int | None:
    """A time option's value in Unix seconds (RFC 3339, or +30d/+8h/+15m from ``now_s``);
    None when not given. Raises click.BadParameter naming the option."""
    from firmware.admin.keys import parse_time  # keys imports this module

    if text is None:
        return None
    try:
        return parse_time(text, now_s)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=name) from None
