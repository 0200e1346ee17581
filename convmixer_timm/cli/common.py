"""What every ``convmixer-timm`` command shares: its one-line errors, progress lines, and printable messages."""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

PROG = "convmixer-timm"


class CliError(Exception):
    """A failure to report as one line (no traceback) with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# C0 and C1 control characters and DEL: a newline would make a message two lines, an escape character (ANSI
# codes) would drive the terminal. They reach messages through paths, names and errors of other libraries.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to print on one line of a terminal: control characters as escapes (``\\n``, ``\\x1b``), and
    the bytes of a file name that is not UTF-8 (held by Python as lone surrogates) as ``\\xff``."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class Progress:
    """Numbered steps with timings on stderr, in the spirit of timm's and huggingface-cli's status lines."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.done = total, quiet, 0

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {printable(what)} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


def refuse_non_finite(state_dict: dict, source: object, verb: str, allowed: bool) -> list[tuple[str, int, int]]:
    """(key, NaN count, inf count) of tensors holding NaN or inf; a CliError unless --allow-non-finite."""
    from ..models.checkpoint import non_finite_message, non_finite_tensors

    non_finite = non_finite_tensors(state_dict)
    if non_finite and not allowed:
        raise CliError(f"{source}: {non_finite_message(non_finite)}. Such weights give NaN outputs; pass "
                       f"--allow-non-finite to {verb} them anyway")
    return non_finite


def warn_non_finite(non_finite: list[tuple[str, int, int]], doing: str, quiet: bool) -> None:
    if non_finite and not quiet:
        from ..models.checkpoint import non_finite_message

        print(f"warning: {doing} as asked (--allow-non-finite): {non_finite_message(non_finite)}", file=sys.stderr)
