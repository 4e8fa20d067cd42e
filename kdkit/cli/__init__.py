"""The ``kdkit`` command: ``kdkit train | eval | predict | init | demo | export | bench | lm | ...``.

Each subcommand lives in its own ``kdkit/cli/_<name>.py`` with ``add_parser(subparsers)``
(which sets ``func``) and imports heavy modules only inside its ``run``. A :class:`KDError`
is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kdkit.errors import KDError

__all__ = ["main", "build_parser"]

# one entry per module kdkit/cli/_<name>.py
_COMMANDS: tuple[str, ...] = (
    "train",
    "eval",
    "predict",
    "init",
    "demo",
    "precompute",
    "cache",
    "export",
    "bench",
    "lm",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors printed as one line (like every other kdkit error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"kdkit: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdkit", description="Knowledge distillation for PyTorch: train a small student."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"kdkit.cli._{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (printed as one line) or --help
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a closed pipe is caught below, not at interpreter exit
        return code
    except BrokenPipeError:  # `kdkit cache info | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except KDError as err:
        lines = (line.strip() for line in str(err).splitlines())
        print(f"kdkit: error: {'; '.join(line for line in lines if line)}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment: a full disk, a permission, a vanished file
        where = f" ({err.filename})" if err.filename else ""
        print(f"kdkit: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
