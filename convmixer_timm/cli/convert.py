"""``convmixer-timm convert``: a checkpoint in any supported layout into a Hub-ready folder.

Every input is checked before anything large is allocated: the model is first built on PyTorch's meta device
(shapes only) and compared with the checkpoint, so ``--num-classes 1000000000`` or ``--model-kwargs dim=10**8``
is refused with the sizes that fit instead of an out-of-memory error.
"""
from __future__ import annotations

import argparse
import ast
import reprlib
import warnings
from typing import Any

from .common import PROG, CliError, Progress, printable, refuse_non_finite, warn_non_finite

DESCRIPTION = (
    "Convert a ConvMixer checkpoint (timm, authors' original nn.Sequential or labml.ai layout; module./_orig_mod. "
    "prefixes and state_dict wrappers are handled; .safetensors, .pth, .pth.tar, .bin) into a folder with "
    "model.safetensors, timm's config.json and a model card. The folder is written beside DIR, reloaded and "
    "compared, and only then moved into place: a failure leaves nothing behind.")

# timm.create_model's own arguments are not the architecture's: pretrained (or a checkpoint_path) would load other
# weights than SRC's, and device/dtype place the model, while convert writes float CPU weights.
_NOT_ARCHITECTURE = frozenset({"device", "dtype"})


def _shown(value: Any) -> str:
    """``value`` for a one-line message, long strings and containers cut short (an error's text unquoted)."""
    if isinstance(value, BaseException):
        text = str(value)
        return printable(text if len(text) <= 200 else f"{text[:90]}...{text[-90:]}")
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlevel = 60, 60, 3
    return printable(short.repr(value))


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
            except (ValueError, SyntaxError, RecursionError, MemoryError):  # not a literal (or a hostile one)
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _fitting_options(state_dict: dict[str, Any], act: str) -> str:
    """The command-line options that build a model these weights fit."""
    from ..hub import architecture_of
    from ..models.variants import find_variant

    try:
        arch = architecture_of(state_dict, act)
    except ValueError:
        return "the weights are not a complete ConvMixer"
    known = find_variant(arch.h, arch.d, arch.k, arch.p)
    in_chans = f" in_chans={arch.in_chans}" if arch.in_chans != 3 else ""
    if known:
        options = f"--model {known.name}" + (f" --model-kwargs{in_chans}" if in_chans else "")
        if arch.num_classes != known.num_classes:
            options += f" --num-classes {arch.num_classes}"
    else:
        options = (f"--model-kwargs dim={arch.h} depth={arch.d} kernel_size={arch.k} patch_size={arch.p}"
                   f"{in_chans} --num-classes {arch.num_classes}")
    return f"pass {options} to convert these weights."


def _card_facts(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The class names (``--labels``) and accuracy (``--top1``) the user states, read before the checkpoint."""
    from ..labels import read_labels_file

    labels = None
    if args.labels is not None:
        if "\0" in args.labels:
            raise CliError(f"--labels {printable(args.labels)}: a path cannot hold a NUL character", code=2)
        try:
            labels = read_labels_file(args.labels)
        except OSError as exc:
            raise CliError(f"cannot read --labels {args.labels}: {exc.strerror or exc}", code=2) from exc
        except ValueError as exc:
            raise CliError(str(exc), code=2) from exc
    if args.dataset is not None:
        from ..labels import check_text

        try:
            check_text(args.dataset, "--dataset")
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


def _architecture_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-kwargs`` and ``--num-classes`` as constructor arguments, refusing what is not the architecture's."""
    import inspect

    from ..models.convmixer import ConvMixer

    kwargs = dict(args.model_kwargs or {})
    if "pretrained" in kwargs or "checkpoint_path" in kwargs:
        raise CliError("--model-kwargs cannot load weights (pretrained, checkpoint_path): convert writes the weights "
                       f"of SRC. The published weights load with timm.create_model(\"{args.model}\", "
                       f"pretrained=True), and `{PROG} list` shows which variants have them", code=2)
    accepted = [name for name in inspect.signature(ConvMixer).parameters if name not in _NOT_ARCHITECTURE]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise CliError(f"--model-kwargs: {_shown(unknown[0])} is not an argument of the architecture; it takes "
                       f"{', '.join(accepted)}", code=2)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def _build(variant: Any, kwargs: dict[str, Any], meta: bool) -> Any:
    import timm
    import torch

    try:
        with torch.device("meta" if meta else "cpu"):
            return timm.create_model(variant.name, **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CliError(f"cannot build {variant.name} with {_shown(kwargs)}: {_shown(exc)}", code=2) from exc


def _check_fit(args: argparse.Namespace, variant: Any, kwargs: dict[str, Any], state_dict: dict[str, Any],
               labels: list[str] | None) -> list[str] | None:
    """Refuse weights that do not fit the model ``kwargs`` build, before it is allocated; return the labels."""
    from ..models.checkpoint import (
        CheckpointError,
        describe_architecture,
        key_differences,
        unfit_dtypes,
        unfit_dtypes_message,
    )

    model = _build(variant, kwargs, meta=True)  # shapes only: nothing is allocated
    expected = model.state_dict()
    checkpoint_arch, model_arch = describe_architecture(state_dict), describe_architecture(expected)
    head = state_dict.get("head.weight")
    expected_classes = kwargs.get("num_classes", variant.num_classes)
    # Only for weights of this very architecture: for any other, the check below names it with every option that
    # fits (--num-classes included), where a hint about the classifier alone would send the user into a second
    # failure.
    if checkpoint_arch == model_arch and head is not None and head.shape[0] != expected_classes:  # head is 2-d
        raise CliError(
            f"the checkpoint's classifier has {head.shape[0]} classes but {variant.name} is built with "
            f"{expected_classes}; pass --num-classes {head.shape[0]}")
    unfit = unfit_dtypes(state_dict, expected)
    if unfit:
        raise CliError(f"{args.src}: {unfit_dtypes_message(unfit)}. Save the floating-point weights again "
                       "(e.g. model.float().state_dict()) and convert that file")
    if labels is not None:
        from ..labels import check_labels

        try:
            labels = list(check_labels(labels, expected_classes, source=f"--labels {args.labels}"))
        except ValueError as exc:
            raise CliError(str(exc), code=2) from exc
    try:
        with warnings.catch_warnings():  # each copy into a meta tensor warns that it is a no-op: here it is meant
            warnings.filterwarnings("ignore", message=".*to a meta parameter")
            model.load_state_dict(dict(state_dict))  # a copy: the layout hook rewrites the dict it is given
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
    return labels


def run(args: argparse.Namespace) -> int:
    from ..hub import WEIGHTS_NAME, check_output_path, recover_output, save_hub_folder
    from ..models.checkpoint import load_checkpoint_file, to_timm_layout
    from ..models.variants import get_variant

    try:
        variant = get_variant(args.model)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), code=2) from exc
    model_kwargs = _architecture_kwargs(args)
    recover_output(args.out)  # a run killed mid-write left staging folders (or, without renameat2, a lone backup)
    try:  # before reading anything: a bad --out fails at once
        out = check_output_path(args.out, args.overwrite)
    except ValueError as exc:
        raise CliError(f"--out: {exc}", code=2) from exc
    labels, metrics = _card_facts(args)

    progress = Progress(3, args.quiet)
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
        non_finite = refuse_non_finite(state_dict, args.src, "convert", args.allow_non_finite)
    warn_non_finite(non_finite, "converting", args.quiet)
    with progress.step(f"loading the weights into {variant.name}"):
        labels = _check_fit(args, variant, model_kwargs, state_dict, labels)
        model = _build(variant, model_kwargs, meta=False)
        model.load_state_dict(state_dict)
    with progress.step(f"writing and verifying {out}"):
        path = save_hub_folder(model.eval(), out, variant.name, overwrite=args.overwrite,
                               dataset=args.dataset, model_args=dict(args.model_kwargs or {}) or None,
                               labels=labels, metrics=metrics,
                               metrics_note="as given by whoever converted them (`--top1`), not re-measured")
    size_mb = (path / WEIGHTS_NAME).stat().st_size / 2**20
    print(printable(f"wrote {path} (model.safetensors {size_mb:.1f} MiB, config.json, README.md); load it with "
                    f"timm.create_model(\"local-dir:{path}\", pretrained=True) or publish it with "
                    f"`{PROG} push {path} --repo-id ORG/NAME`"))
    return 0


def _class_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_class_count.__name__ = "class count (an integer >= 0)"  # how argparse names the type in its error


def add_parser(commands: Any) -> None:
    """The ``convert`` sub-command and its options."""
    p = commands.add_parser(
        "convert", help="turn a checkpoint into a Hub-ready folder", description=DESCRIPTION,
        epilog="example: convmixer-timm convert convmixer_768_32_ks7_p7_relu.pth.tar --model convmixer_768_32 "
               "--out ./convmixer_768_32",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint file")
    p.add_argument("--model", required=True, metavar="NAME", help="variant name (see `convmixer-timm list`)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (kept if the write fails)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights holding NaN or infinite values (refused by default)")
    p.add_argument("--num-classes", type=_class_count, metavar="N",
                   help="classes of the checkpoint's classifier (default: the variant's)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=_ParseKwargs, metavar="KEY=VALUE",
                   help="constructor overrides, as in timm's train.py, e.g. dim=256 depth=8 act_layer=relu")
    p.add_argument("--dataset", help="data set the weights were trained on, for the model card (default: not "
                                     "stated, unless the weights are the published ones)")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line or a JSON list, one per class in output order (default: the "
                        "names of --dataset if it is CIFAR-10 or ImageNet-1k, or of the published weights; else "
                        "none are known and none are written)")
    p.add_argument("--top1", type=float, metavar="PCT",
                   help="top-1 accuracy (%%) of these weights on --dataset, for the model card")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
