"""``convmixer-timm``: list the ConvMixer zoo, convert checkpoints to Hub folders, publish them, run the demo.

    convmixer-timm list [--json]
    convmixer-timm convert SRC --model NAME --out DIR [--overwrite] [--num-classes N] [--model-kwargs K=V ...]
                           [--dataset NAME] [--labels FILE] [--top1 PCT]
    convmixer-timm push DIR --repo-id ID [--token-stdin] [--endpoint URL] [--private] [--revision R]
    convmixer-timm demo [...]

Also ``python -m convmixer_timm``. Progress and status go to stderr, results (tables, JSON) to stdout, so the
output can be piped. Exit status: 0 success, 1 a failure the message explains, 2 bad usage, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). Every failure is one line on stderr naming the cause and the fix; a token is
never printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import convert, push
from .common import PROG, CliError, printable

__all__ = ["PROG", "CliError", "build_parser", "main", "zoo_records"]

_PACKAGE = __name__.rpartition(".")[0]  # convmixer_timm


# ---------------------------------------------------------------------------------------------------- list


def zoo_records() -> list[dict[str, Any]]:
    """What ``list --json`` prints: ``zoo_rows()`` (shared with the README table) plus the exact MAC count."""
    from ..models.variants import VARIANTS_BY_NAME, zoo_rows

    return [{**row, "macs": VARIANTS_BY_NAME[row["name"]].macs()} for row in zoo_rows()]


def _format_table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    records = zoo_records()
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [["name", "h", "d", "k", "p", "act", "params", "GMACs", "img", "top-1", "top-1 source", "weights"]]
    for r in records:
        rows.append([
            r["name"], str(r["h"]), str(r["d"]), str(r["k"]), str(r["p"]), r["act"], f"{r['params'] / 1e6:.2f}M",
            f"{r['macs'] / 1e9:.2f}", str(r["img_size"]), "-" if r["top1"] is None else f"{r['top1']:.2f}",
            r["top1_source"] or "-", r["weights"] or "none",
        ])
    print(_format_table(rows, right={1, 2, 3, 4, 6, 7, 8, 9}))
    print("\nGMACs: analytic multiply-accumulates at the default image size (img), depthwise term included; "
          "FLOPs = 2 x MACs.")
    return 0


# ---------------------------------------------------------------------------------------------------- demo

_DEMO_DESCRIPTION = "Train a small ConvMixer on a toy data set end to end and write it as a Hub folder."


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported only when run: the demo needs optional dependencies (scikit-learn) the other commands do not.
    import importlib

    try:
        demo = importlib.import_module(f"{_PACKAGE}.demo")
    except ImportError as exc:
        if getattr(exc, "name", None) == f"{_PACKAGE}.demo":
            reason = "the demo is not part of this installation of convmixer-timm (no convmixer_timm.demo module)"
        else:
            reason = f"the demo needs {exc.name or exc}: install it with `pip install 'convmixer-timm[demo]'`"
        if any(a in ("-h", "--help") for a in args.demo_args):
            print(f"usage: {PROG} demo [...]\n\n{_DEMO_DESCRIPTION}\n\n{reason}")
            raise SystemExit(0) from None  # as argparse does after --help
        raise CliError(reason) from exc
    parser = argparse.ArgumentParser(prog=f"{PROG} demo", description=_DEMO_DESCRIPTION)
    demo.add_arguments(parser)
    return int(demo.run(parser.parse_args(args.demo_args)) or 0)


# ---------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The ConvMixer family (\"Patches Are All You Need?\") for timm: list the variants, convert "
                    "checkpoints to Hugging Face Hub folders, publish them.",
        epilog=f"Run `{PROG} COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", help="show the ConvMixer zoo as a table",
                       description="Every ConvMixer variant: architecture, exact parameters, analytic GMACs at the "
                                   "default image size, published top-1 with its source, Hub weights.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=_cmd_list)

    convert.add_parser(sub)
    push.add_parser(sub)

    # The demo's options belong to the demo module; parse them only when it runs so that `list`, `convert` and
    # `push` never import it (nor its optional dependencies).
    p = sub.add_parser("demo", help="train a small ConvMixer end to end (optional extra: [demo])",
                       description=_DEMO_DESCRIPTION, add_help=False, prefix_chars="\0")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up (staging folders) runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    # One shot: a second SIGTERM during the clean-up ends the process the default way (no traceback; the next run
    # removes what is left) instead of interrupting the clean-up with another exception.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convmixer-timm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill` and service managers send SIGTERM, which by default ends Python without running any clean-up.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _explained(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the errors whose message already names the cause and the fix."""
    if isinstance(exc, (FileExistsError, FileNotFoundError)):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:  # the system's own words name the file and the cause
        return True
    # Looked up, not imported: the modules are loaded whenever one of their errors exists, and importing them
    # here would import torch while a signal may be on its way.
    kinds = [getattr(sys.modules.get(f"{_PACKAGE}.{module}"), name, None) for module, name in (
        ("hub", "HubFolderError"), ("hub", "HubPushError"), ("models.checkpoint", "CheckpointError"),
        ("models.pretrained", "PretrainedWeightsUnavailableError"))]
    return isinstance(exc, tuple(kind for kind in kinds if isinstance(kind, type)))


def _run(args: argparse.Namespace) -> int:
    # Everything, the first imports included, runs inside this try: a SIGTERM that arrives while torch is being
    # imported (the first seconds of every command) ends with the documented status, not a traceback.
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        message, code = str(exc), exc.code
    except _Terminated:
        message, code = "terminated (SIGTERM)", 128 + signal.SIGTERM
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except BrokenPipeError:
        # The reader went away (`convmixer-timm list | head`): stop quietly, and keep Python from reporting the
        # same error again when it flushes stdout at exit (the recipe in the `signal` module's documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if not _explained(exc):
            raise
        message, code = str(exc), 1
    print(f"{PROG} {args.command}: error: {printable(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
