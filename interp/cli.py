"""Command-line entry point: ``cnn-internals VERB ...``.

Each verb lives in its own module under :mod:`interp.commands` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. This file only wires them
together and turns every error into one line on stderr with exit status 2
(``--debug``: the full traceback instead); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from interp.parallel import told_everyone

# Verb -> module under interp.commands, in the order shown by --help.
COMMANDS = ["demo", "layers", "rf", "visualize", "gallery", "train", "finetune", "compare", "reproduce", "bench"]

# Errors a command raises on purpose with a message written for the user:
# printed as they are. Anything else is a surprise and gets its type too.
EXPECTED = (ValueError, FileNotFoundError, RuntimeError)

DEBUG_HELP = "on an error, show the full Python traceback instead of one line"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, like every other error of the CLI."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# reST that module docstrings use, and the plain text --help shows instead.
_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`interp.mine` -> interp.mine
_LITERAL = re.compile(r"``(.+?)``", re.S)  # ``code`` -> code


def plain_text(text: str | None) -> str | None:
    """``text`` with reST roles and double-backquoted literals turned into plain words (for --help)."""
    if not text:
        return text
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Make a verb's description and option help plain text, and give it ``--debug`` too."""
    parser.description = plain_text(parser.description)
    parser.epilog = plain_text(parser.epilog)
    for action in parser._actions:  # argparse keeps them there; there is no public accessor
        action.help = plain_text(action.help)
    # SUPPRESS: absent after the verb, the flag keeps the value given before it.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cnn-internals",
        description="See what convolutional networks see.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"interp.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"interp.commands.{name}":
                continue  # verb not built yet
            raise
        module.add_parser(sub)
        if name in sub.choices:
            _plain_help(sub.choices[name])
    for choice in sub._choices_actions:  # the one-line help of each verb in `cnn-internals --help`
        choice.help = plain_text(choice.help)
    return parser


def error_line(command: str, exc: BaseException) -> str:
    """The one line printed for ``exc``: its message, with its type when it was not an expected error.

    Notes added with ``exc.add_note`` (e.g. where the mining results were
    kept) follow on the same line.
    """
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if not isinstance(exc, EXPECTED) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    notes = [n.strip() for n in getattr(exc, "__notes__", ()) if n.strip()]
    return f"cnn-internals {command}: error: " + "; ".join([message, *notes])


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests capture stdout): nothing to flush
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `cnn-internals layers MODEL | head`: the reader left; not an error of ours.
        _silence_stdout()
        return 0
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        notes = [n.strip() for n in getattr(exc, "__notes__", ()) if n.strip()]
        print("; ".join([f"cnn-internals {args.command}: interrupted", *notes]), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line (the traceback with --debug)
        if args.debug:
            raise
        # Under torchrun an error every rank raised together is printed by rank 0 alone.
        if not (told_everyone(exc) and os.environ.get("RANK", "0") != "0"):
            print(error_line(args.command, exc), file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m interp.cli
    sys.exit(main())
