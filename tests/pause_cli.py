"""Run the ``convmixer-timm`` command line, stopped at a named point, for tests that act on a real process there.

    python tests/pause_cli.py [--no-exchange] POINT MARKER -- CLI-ARGS...

At POINT the process writes its pid to MARKER and waits until the test deletes MARKER (or a signal ends it);
then it goes on as ``python -m convmixer_timm CLI-ARGS...`` would, exit status included. The points wrap the
package's own functions from outside, so the package carries no test hooks:

* ``staging-written``: ``convert`` has written and checked its hidden staging folder and is about to move it to
  the output (the start of ``hub.install.move_into_place``); the previous output is untouched.
* ``after-exchange``: the staging folder and the previous output have just been swapped (``hub.install.exchange``
  returned True); the staging path holds the previous output.
* ``after-first-rename``: without ``renameat2`` (pass ``--no-exchange``), the previous output has just been
  renamed to its backup and the new one is not yet in place.
* ``before-upload``: ``push`` has read the token and checked the folder, and is about to upload it.

``--no-exchange`` takes the path of systems without ``renameat2(RENAME_EXCHANGE)``.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waiting import wait_until

from convmixer_timm import cli, hub
from convmixer_timm.hub import install as safe_install

POINTS = ("staging-written", "after-exchange", "after-first-rename", "before-upload")


def pause(point: str, marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    # Bounded by waiting.py's poll count: a test that dies without deleting the marker does not leave this behind.
    wait_until(lambda: not marker.exists(), f"the test releasing {point}")


def before(function: Callable[..., Any], point: str, marker: Path) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        pause(point, marker)
        return function(*args, **kwargs)
    return wrapper


def install(point: str, marker: Path, no_exchange: bool) -> None:
    real_exchange = safe_install.exchange
    if no_exchange:
        safe_install.exchange = lambda a, b: False
    if point == "staging-written":
        safe_install.move_into_place = before(safe_install.move_into_place, point, marker)
    elif point == "before-upload":
        hub.push_hub_folder = before(hub.push_hub_folder, point, marker)  # cli imports it when push runs
    elif point == "after-exchange":
        def exchange(a: Path, b: Path) -> bool:
            swapped = real_exchange(a, b)
            if swapped:
                pause(point, marker)
            return swapped
        safe_install.exchange = exchange
    elif point == "after-first-rename":
        # Replacing an existing output without an exchange, move_into_place renames twice: the previous output to its
        # backup, then the staging folder into place. Pause as the second begins, so that a signal arrives
        # where move_into_place handles it (put the backup back), with the first one done.
        real_install, real_rename = safe_install.move_into_place, os.rename
        calls = 0

        def rename(src: Any, dst: Any, **kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                pause(point, marker)
            real_rename(src, dst, **kwargs)

        @functools.wraps(real_install)
        def install_with_pause(*args: Any, **kwargs: Any) -> Any:
            os.rename = rename  # only while move_into_place runs
            try:
                return real_install(*args, **kwargs)
            finally:
                os.rename = real_rename
        safe_install.move_into_place = install_with_pause


def main(argv: list[str]) -> int:
    no_exchange = argv[:1] == ["--no-exchange"]
    if no_exchange:
        argv = argv[1:]
    if len(argv) < 3 or argv[2] != "--" or argv[0] not in POINTS:
        print(f"usage: pause_cli.py [--no-exchange] {{{','.join(POINTS)}}} MARKER -- CLI-ARGS...", file=sys.stderr)
        return 2
    install(argv[0], Path(argv[1]), no_exchange)
    return cli.main(argv[3:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
