"""``convmixer-timm push``: publish a Hub folder, with a token that is checked first and never printed."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import PROG, CliError, Progress, printable, refuse_non_finite, warn_non_finite

_TOKEN_ON_COMMAND_LINE = (
    "warning: --token puts the token on the command line, where every user of this machine can read it (ps, "
    "/proc/PID/cmdline) and where shell history keeps it; prefer HF_TOKEN, `hf auth login`, or --token-stdin")


def _token_from(args: argparse.Namespace) -> str | None:
    """The token the user gave on the command line or standard input; None lets huggingface_hub use HF_TOKEN or
    its stored login."""
    if args.token_stdin or args.token == "-":
        if sys.stdin is None:
            raise CliError("--token-stdin: there is no standard input to read the token from", code=2)
        if sys.stdin.isatty():
            import getpass

            token = getpass.getpass("Hub token (not echoed): ")
        else:
            token = sys.stdin.readline()
        token = token.strip()
        if not token:
            raise CliError("--token-stdin read an empty token; pipe it in, e.g. "
                           f"`{PROG} push DIR --repo-id ID --token-stdin < token-file`", code=2)
        _check_token(token, "--token-stdin")
        return token
    if args.token:
        print(_TOKEN_ON_COMMAND_LINE, file=sys.stderr)
        _check_token(args.token, "--token")
        return args.token
    from huggingface_hub import get_token

    from ..hub.publish import token_source

    stored = get_token()  # HF_TOKEN or the stored login: checked here too, before anything is loaded or sent
    if stored:
        _check_token(stored, token_source())
    return None



def _check_token(token: str, source: str) -> None:
    from ..hub import malformed_token

    problem = malformed_token(token, source)
    if problem:
        raise CliError(problem, code=2)


def _redacted(exc: BaseException, secret: str | None) -> str | None:
    """``exc`` as one line without ``secret``, if the secret appears anywhere in it or in what caused it (an HTTP
    library quoting the ``Authorization`` header it refused); None when it does not."""
    if not secret:
        return None
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    if not any(secret in str(e) or any(secret in repr(a) for a in e.args) for e in chain):
        return None
    text = (str(exc).splitlines() or [""])[0].replace(secret, "<token>")
    return f"{type(exc).__name__}: {text}"


def _check_target(args: argparse.Namespace) -> None:
    from ..hub.publish import check_push_target

    try:
        check_push_target(args.repo_id, args.endpoint, args.revision)
    except ValueError as exc:
        option = "--repo-id" if "repo id" in str(exc) else "--endpoint" if "endpoint" in str(exc) else "--revision"
        raise CliError(f"{option}: {exc}", code=2) from None


def run(args: argparse.Namespace) -> int:
    _check_target(args)  # before the token is read or anything loaded: no network for a repo id the Hub refuses
    token = _token_from(args)
    try:
        return _push(args, token)
    except (CliError, KeyboardInterrupt):
        raise
    except Exception as exc:
        redacted = _redacted(exc, token)
        if redacted is None:
            raise
        # Raised from None: a traceback of the original would print the token.
        raise CliError(f"upload failed ({redacted}); the token was left out of this message. Check the token "
                       "(a printable hf_... string) and --endpoint") from None


def _push(args: argparse.Namespace, token: str | None) -> int:
    from ..hub import WEIGHTS_NAME, push_hub_folder, verify_hub_folder

    progress = Progress(2, args.quiet)
    with progress.step(f"checking that {args.dir} loads with timm"):
        verify_hub_folder(args.dir)
        from safetensors.torch import load_file

        non_finite = refuse_non_finite(load_file(Path(args.dir) / WEIGHTS_NAME), Path(args.dir) / WEIGHTS_NAME,
                                         "publish", args.allow_non_finite)
    warn_non_finite(non_finite, "publishing", args.quiet)
    from huggingface_hub import constants

    endpoint = args.endpoint or None  # None: huggingface_hub's own default (HF_ENDPOINT, else huggingface.co)
    with progress.step(f"uploading to {args.repo_id} at {endpoint or constants.ENDPOINT}"):
        url = push_hub_folder(args.dir, args.repo_id, token=token, endpoint=endpoint, private=args.private,
                              revision=args.revision, commit_message=args.commit_message, verify=False)
    revision = f"@{args.revision}" if args.revision else ""
    print(printable(f"pushed {args.dir} to {args.repo_id}: {url}"))
    print(f"load it with timm.create_model(\"hf-hub:{args.repo_id}{revision}\", pretrained=True)")
    return 0


def add_parser(commands: Any) -> None:
    """The ``push`` sub-command and its options."""
    p = commands.add_parser(
        "push", help="publish a Hub folder with huggingface_hub",
        description="Upload a folder written by `convert` to a Hugging Face Hub model repo (created if missing). "
                    "The folder must load with timm first: it is built through local-dir: and run once.",
        epilog="The token comes from HF_TOKEN, the stored login (`hf auth login`) or --token-stdin. example: "
               "convmixer-timm push ./convmixer_768_32 --repo-id me/convmixer_768_32 --token-stdin < token-file",
    )
    p.add_argument("dir", metavar="DIR", help="folder written by `convmixer-timm convert`")
    p.add_argument("--repo-id", required=True, metavar="ID", help="ORG/NAME of the model repo")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--token-stdin", action="store_true",
                        help="read the Hub token from standard input (default: HF_TOKEN or the stored login)")
    tokens.add_argument("--token", metavar="T",
                        help="Hub token; visible to every local user in the process list, so prefer HF_TOKEN or "
                             "--token-stdin ('-' reads standard input)")
    p.add_argument("--endpoint", metavar="URL", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", metavar="R", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", metavar="M", help="commit message")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="publish weights holding NaN or infinite values (refused by default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
