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
import ast
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROG = "convmixer-timm"


class CliError(Exception):
    """A failure to report as one line (no traceback) with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Progress:
    """Numbered steps with timings on stderr, in the spirit of timm's and huggingface-cli's status lines."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.done = total, quiet, 0

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- list


def zoo_records() -> list[dict[str, Any]]:
    """What ``list --json`` prints: ``zoo_rows()`` (shared with the README table) plus the exact MAC count."""
    from .models.variants import VARIANTS_BY_NAME, zoo_rows

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


# ---------------------------------------------------------------------------------------------------- convert


class _ParseKwargs(argparse.Action):
    """``--model-kwargs dim=32 act_layer=relu`` as in timm's train.py: values are Python literals or strings."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects KEY=VALUE items, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _fitting_options(state_dict: dict[str, Any], act: str) -> str:
    """The command-line options that build a model these weights fit."""
    from .hub import architecture_of
    from .models.variants import find_variant

    try:
        arch = architecture_of(state_dict, act)
    except ValueError:
        return "the weights are not a complete ConvMixer"
    known = find_variant(arch.h, arch.d, arch.k, arch.p)
    if known:
        options = f"--model {known.name}"
        if arch.num_classes != known.num_classes:
            options += f" --num-classes {arch.num_classes}"
    else:
        options = (f"--model-kwargs dim={arch.h} depth={arch.d} kernel_size={arch.k} patch_size={arch.p}"
                   + (f" in_chans={arch.in_chans}" if arch.in_chans != 3 else "")
                   + f" --num-classes {arch.num_classes}")
    return f"pass {options} to convert these weights."


def _card_facts(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The class names (``--labels``) and accuracy (``--top1``) the user states, read before the checkpoint."""
    from .labels import read_labels_file

    labels = None
    if args.labels is not None:
        try:
            labels = read_labels_file(args.labels)
        except OSError as exc:
            raise CliError(f"cannot read --labels {args.labels}: {exc.strerror or exc}", code=2) from exc
        except ValueError as exc:
            raise CliError(str(exc), code=2) from exc
    metrics = None
    if args.top1 is not None:
        if not 0.0 <= args.top1 <= 100.0:
            raise CliError(f"--top1 is a percentage between 0 and 100, got {args.top1}", code=2)
        if not args.dataset:
            raise CliError("--top1 needs --dataset, the data set the figure was measured on "
                           "(e.g. --dataset imagenet-1k)", code=2)
        metrics = {"top1": args.top1}
    return labels, metrics


def _cmd_convert(args: argparse.Namespace) -> int:
    from .hub import WEIGHTS_NAME, check_output_path, recover_output, save_hub_folder
    from .models.checkpoint import (
        CheckpointError,
        describe_architecture,
        key_differences,
        load_checkpoint_file,
        to_timm_layout,
        unfit_dtypes,
        unfit_dtypes_message,
    )
    from .models.variants import get_variant

    try:
        variant = get_variant(args.model)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), code=2) from exc
    recover_output(args.out)  # a run killed mid-write left staging folders (or, without renameat2, a lone backup)
    try:  # before reading anything: a bad --out fails at once
        out = check_output_path(args.out, args.overwrite)
    except ValueError as exc:
        raise CliError(f"--out: {exc}", code=2) from exc
    model_kwargs = dict(args.model_kwargs or {})
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    labels, metrics = _card_facts(args)

    progress = _Progress(3, args.quiet)
    with progress.step(f"reading {args.src}"):
        try:
            raw = load_checkpoint_file(args.src)
        except FileNotFoundError:
            raise
        except PermissionError as exc:
            raise CliError(f"cannot read {args.src}: permission denied; make it readable to this user, or convert "
                           "a copy") from exc
        except OSError as exc:  # torch's zip reader reports some truncated files as a bare OSError (EINVAL)
            raise CliError(f"{args.src} is truncated or corrupt ({type(exc).__name__}: {exc}); download or save "
                           "it again") from exc
        state_dict = to_timm_layout(raw)
        non_finite = _refuse_non_finite(state_dict, args.src, "convert", args.allow_non_finite)
    _warn_non_finite(non_finite, "converting", args.quiet)
    with progress.step(f"loading the weights into {variant.name}"):
        import timm

        try:
            model = timm.create_model(variant.name, **model_kwargs)
        except (TypeError, ValueError) as exc:
            raise CliError(f"cannot build {variant.name} with {model_kwargs}: {exc}", code=2) from exc
        expected = model.state_dict()
        checkpoint_arch, model_arch = describe_architecture(state_dict), describe_architecture(expected)
        head = state_dict.get("head.weight")
        expected_classes = model_kwargs.get("num_classes", variant.num_classes)
        # Only for weights of this very architecture: for any other, load_state_dict below names it with every
        # option that fits (--num-classes included), where a hint about the classifier alone would send the user
        # into a second failure.
        if head is not None and head.shape[0] != expected_classes and checkpoint_arch == model_arch:
            raise CliError(
                f"the checkpoint's classifier has {head.shape[0]} classes but {variant.name} is built with "
                f"{expected_classes}; pass --num-classes {head.shape[0]}")
        unfit = unfit_dtypes(state_dict, expected)
        if unfit:
            raise CliError(f"{args.src}: {unfit_dtypes_message(unfit)}. Save the floating-point weights again "
                           "(e.g. model.float().state_dict()) and convert that file")
        if labels is not None:
            from .labels import check_labels

            try:
                labels = list(check_labels(labels, expected_classes, source=f"--labels {args.labels}"))
            except ValueError as exc:
                raise CliError(str(exc), code=2) from exc
        try:
            model.load_state_dict(state_dict)
        except CheckpointError as exc:
            raise CliError(f"{exc} Here: {_fitting_options(state_dict, variant.act)}") from exc
        except RuntimeError as exc:
            differences = key_differences(state_dict, expected) or str(exc).splitlines()[0]
            if checkpoint_arch == model_arch:
                fix = ("the architecture matches, so remove the keys named above from the state dict (or add the "
                       "missing ones) and save it again")
            else:
                fix = _fitting_options(state_dict, variant.act)
            raise CliError(f"the checkpoint ({checkpoint_arch}) does not fit {variant.name} ({model_arch}): "
                           f"{differences}; {fix}") from exc
    with progress.step(f"writing and verifying {out}"):
        path = save_hub_folder(model.eval(), out, variant.name, overwrite=args.overwrite,
                               dataset=args.dataset, model_args=dict(args.model_kwargs or {}) or None,
                               labels=labels, metrics=metrics,
                               metrics_note="as given by whoever converted them (`--top1`), not re-measured")
    size_mb = (path / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"wrote {path} (model.safetensors {size_mb:.1f} MiB, config.json, README.md); load it with "
          f"timm.create_model(\"local-dir:{path}\", pretrained=True) or publish it with "
          f"`{PROG} push {path} --repo-id ORG/NAME`")
    return 0


# ---------------------------------------------------------------------------------------------------- push


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

    from .hub import _token_source

    stored = get_token()  # HF_TOKEN or the stored login: checked here too, before anything is loaded or sent
    if stored:
        _check_token(stored, _token_source())
    return None


def _refuse_non_finite(state_dict: dict, source: object, verb: str, allowed: bool) -> list[tuple[str, int, int]]:
    """(key, NaN count, inf count) of tensors holding NaN or inf; a CliError unless --allow-non-finite."""
    from .models.checkpoint import non_finite_message, non_finite_tensors

    non_finite = non_finite_tensors(state_dict)
    if non_finite and not allowed:
        raise CliError(f"{source}: {non_finite_message(non_finite)}. Such weights give NaN outputs; pass "
                       f"--allow-non-finite to {verb} them anyway")
    return non_finite


def _warn_non_finite(non_finite: list[tuple[str, int, int]], doing: str, quiet: bool) -> None:
    if non_finite and not quiet:
        from .models.checkpoint import non_finite_message

        print(f"warning: {doing} as asked (--allow-non-finite): {non_finite_message(non_finite)}", file=sys.stderr)


def _check_token(token: str, source: str) -> None:
    from .hub import malformed_token

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


def _cmd_push(args: argparse.Namespace) -> int:
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
    from .hub import WEIGHTS_NAME, push_hub_folder, verify_hub_folder

    progress = _Progress(2, args.quiet)
    with progress.step(f"checking that {args.dir} loads with timm"):
        verify_hub_folder(args.dir)
        from safetensors.torch import load_file

        non_finite = _refuse_non_finite(load_file(Path(args.dir) / WEIGHTS_NAME), Path(args.dir) / WEIGHTS_NAME,
                                         "publish", args.allow_non_finite)
    _warn_non_finite(non_finite, "publishing", args.quiet)
    from huggingface_hub import constants

    endpoint = args.endpoint or None  # None: huggingface_hub's own default (HF_ENDPOINT, else huggingface.co)
    with progress.step(f"uploading to {args.repo_id} at {endpoint or constants.ENDPOINT}"):
        url = push_hub_folder(args.dir, args.repo_id, token=token, endpoint=endpoint, private=args.private,
                              revision=args.revision, commit_message=args.commit_message, verify=False)
    revision = f"@{args.revision}" if args.revision else ""
    print(f"pushed {args.dir} to {args.repo_id}: {url}\nload it with "
          f"timm.create_model(\"hf-hub:{args.repo_id}{revision}\", pretrained=True)")
    return 0


# ---------------------------------------------------------------------------------------------------- demo

_DEMO_DESCRIPTION = "Train a small ConvMixer on a toy data set end to end and write it as a Hub folder."


def _cmd_demo(args: argparse.Namespace) -> int:
    # Imported only when run: the demo needs optional dependencies (scikit-learn) the other commands do not.
    import importlib

    try:
        demo = importlib.import_module(f"{__package__}.demo")
    except ImportError as exc:
        if getattr(exc, "name", None) == f"{__package__}.demo":
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
    from . import __version__

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

    p = sub.add_parser(
        "convert", help="turn a checkpoint into a Hub-ready folder",
        description="Convert a ConvMixer checkpoint (timm, authors' original nn.Sequential or labml.ai layout; "
                    "module./_orig_mod. prefixes and state_dict wrappers are handled; .safetensors, .pth, "
                    ".pth.tar, .bin) into a folder with model.safetensors, timm's config.json and a model card. "
                    "The folder is written beside DIR, reloaded and compared, and only then moved into place: "
                    "a failure leaves nothing behind.",
        epilog="example: convmixer-timm convert convmixer_768_32_ks7_p7_relu.pth.tar --model convmixer_768_32 "
               "--out ./convmixer_768_32",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint file")
    p.add_argument("--model", required=True, metavar="NAME", help="variant name (see `convmixer-timm list`)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (kept if the write fails)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights holding NaN or infinite values (refused by default)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="classes of the checkpoint's classifier (default: the variant's)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=_ParseKwargs, metavar="KEY=VALUE",
                   help="constructor overrides, as in timm's train.py, e.g. dim=256 depth=8 act_layer=relu")
    p.add_argument("--dataset", help="data set the weights were trained on, for the model card (default: not "
                                     "stated, unless the weights are the published ones)")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line or a JSON list, one per class in output order (default: the "
                        "variant's data set's names when --num-classes and --dataset leave it unchanged, else none)")
    p.add_argument("--top1", type=float, metavar="PCT",
                   help="top-1 accuracy (%%) of these weights on --dataset, for the model card")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
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
    p.set_defaults(func=_cmd_push)

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
    # Looked up, not imported: the modules are loaded whenever one of their errors exists, and importing them
    # here would import torch while a signal may be on its way.
    kinds = [getattr(sys.modules.get(f"{__package__}.{module}"), name, None) for module, name in (
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
    print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
