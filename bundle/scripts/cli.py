"""The command line of the bundle's scripts: python-fire, with -h and --help always asking for help."""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import fire


def run(main: Callable[..., Any], argv: Sequence[str] | None = None) -> Any:
    """`fire.Fire(main)` on `argv` (default: the command line). -h or --help print fire's help page: a `main`
    that takes `**overrides` would otherwise receive ``help=True`` as a config override and start its work."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        args = ["--", "--help"]  # fire's help of `main` itself (with other arguments it would call `main` first)
    return fire.Fire(main, command=args)
