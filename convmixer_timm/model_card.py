"""Model cards (README.md) for Hub folders written by ``save_hub_folder``.

A card states only facts about the weights it describes: the architecture's exact parameter count and analytic
MACs (from the ``Variant`` formulas), figures measured or given for these weights (``metrics``), the training data
set when someone stated it, and the published top-1 of the variant table (with its source and data set) only when
the weights are the published ones, identified by digest.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .labels import canonical_dataset
from .models.variants import Variant

__all__ = ["Architecture", "render_model_card"]

# Hub dataset ids for the data sets of the variant table; anything else is written as the caller named it.
HUB_DATASET_IDS = {"imagenet-1k": "imagenet-1k", "cifar-10": "cifar10"}


def _hub_dataset_id(name: str) -> str:
    return HUB_DATASET_IDS.get(canonical_dataset(name) or name, name)

CITATION = """@article{trockman2023patches,
  title={Patches Are All You Need?},
  author={Trockman, Asher and Kolter, J. Zico},
  journal={Transactions on Machine Learning Research},
  year={2023},
  url={https://arxiv.org/abs/2201.09792}
}"""


@dataclass(frozen=True)
class Architecture:
    """The ConvMixer a folder holds, as read from its weights (act and pooling come from its config)."""

    h: int
    d: int
    k: int
    p: int
    act: str
    in_chans: int
    num_classes: int

    def as_variant(self, base: Variant) -> Variant:
        """``base`` with this architecture, so the table's formulas give this model's params and MACs."""
        return dataclasses.replace(base, h=self.h, d=self.d, k=self.k, p=self.p, act=self.act)

    def is_published(self, variant: Variant) -> bool:
        """Whether this is exactly the configuration the variant's published numbers are for."""
        return (self.h, self.d, self.k, self.p, self.act, self.in_chans, self.num_classes) == (
            variant.h, variant.d, variant.k, variant.p, variant.act, 3, variant.num_classes)


# Characters YAML reads as line breaks or refuses in a document (besides C0/C1 controls); written as escapes.
_YAML_ESCAPED = {"\u2028", "\u2029", "\ufeff"}


def _yaml_str(value: str) -> str:
    """``value`` as a YAML double-quoted scalar that reads back as exactly ``value`` (YAML 1.1 and 1.2).

    Quoting keeps names like "sklearn digits: 8x8" or "- x" intact; backslash, quote and every character YAML
    would take as a line break or refuse are escaped, so no value can end the scalar or the front matter.
    """
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or 0x7F <= code <= 0x9F or char in _YAML_ESCAPED or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# Characters markdown (CommonMark, GitHub's tables, the Hub's maths) gives a meaning; each is written escaped.
_MD_PUNCTUATION = set("\\`*_{}[]()#!|~$")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _md(text: str) -> str:
    """``text`` as markdown that shows exactly ``text``: no emphasis, link, table cell break or HTML tag."""
    text = " ".join(str(text).split())  # a line break would end a list item or a table row
    return "".join(_HTML_ENTITIES.get(c) or (f"\\{c}" if c in _MD_PUNCTUATION else c) for c in text)


def _code(text: str) -> str:
    """``text`` as a markdown code span: shown verbatim (HTML included), whatever backticks it holds."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _repo_name_for_code(repo_name: str) -> str:
    """The folder's name where it can be a Hub repo name (a code snippet quotes it), else a placeholder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(f"ORG/{repo_name}")
    except HFValidationError:
        return "NAME"
    return repo_name


def _fmt_metric(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_model_card(
        *,
        repo_name: str,
        variant: Variant,
        arch: Architecture,
        input_size: tuple[int, int, int],
        global_pool: str,
        param_count: int,
        metrics: Mapping[str, Any] | None = None,
        metrics_note: str | None = None,
        dataset: str | None = None,
        published: bool = False,
        labels: Sequence[str] | None = None,
) -> str:
    """Markdown with Hub YAML front matter describing one ConvMixer folder, stating only known facts.

    ``metrics`` maps metric names to values for these weights (e.g. ``{"top1": 98.6, "dataset": "sklearn
    digits"}``); a ``dataset`` entry names what they were measured on, and ``metrics_note`` says where they come
    from (default: measured for these weights). ``dataset`` is what the weights were trained on, if known.
    ``published`` means the weights were identified (by digest) as the variant's published ones: only then are the
    table's top-1 and data set quoted. ``labels`` are the class names written into config.json, if any.
    """
    metrics = dict(metrics or {})
    code_name = _repo_name_for_code(repo_name)
    measured_on = metrics.pop("dataset", None)
    trained_on = dataset or (variant.dataset if published else None)
    spec = arch.as_variant(variant)
    _, height, width = input_size
    macs = spec.macs(img_size=height, in_chans=arch.in_chans, num_classes=arch.num_classes) if height == width \
        else None

    lines = ["---", "tags:", "- image-classification", "- timm", "- convmixer", "library_name: timm",
             "pipeline_tag: image-classification", "license: mit"]
    if trained_on:
        lines += ["datasets:", f"- {_yaml_str(_hub_dataset_id(trained_on))}"]
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    evaluated_on = measured_on or trained_on
    if numeric and evaluated_on:
        # model-index is how the Hub shows evaluation results; only figures for these weights go here.
        lines += ["model-index:", f"- name: {_yaml_str(repo_name)}", "  results:",
                  "  - task:", "      type: image-classification",
                  "    dataset:", f"      name: {_yaml_str(evaluated_on)}",
                  f"      type: {_yaml_str(_hub_dataset_id(evaluated_on))}",
                  "    metrics:"]
        for name, value in numeric.items():
            metric_type = "accuracy" if name.lower().startswith("top") else name
            lines += [f"    - type: {_yaml_str(metric_type)}", f"      name: {_yaml_str(name)}",
                      f"      value: {value}"]
    lines += ["---", "", f"# Model card for {_md(repo_name)}", ""]

    same = "" if arch.is_published(variant) else (
        f" Its configuration differs from the published `{variant.name}` "
        f"(h={variant.h}, d={variant.d}, k={variant.k}, p={variant.p}, {variant.act}, {variant.num_classes} classes).")
    if labels:
        shown = ", ".join(_code(name) for name in labels[:10]) + (", ..." if len(labels) > 10 else "")
        class_names = f"{shown} (`label_names` in config.json)"
    else:
        class_names = ("not known: none were given and the training data set does not imply them, so the outputs "
                       "are class indices (transformers shows them as LABEL_0, LABEL_1, ...)")
    lines += [
        f"A ConvMixer image classifier built as timm's `{variant.name}` architecture.{same}",
        "",
        "ConvMixer (\"Patches Are All You Need?\", Trockman & Kolter, TMLR 2023) embeds the image in p x p patches "
        "with a strided convolution, then repeats d identical blocks at that one resolution: a residual depthwise "
        "k x k convolution mixes space, a pointwise 1 x 1 convolution mixes channels, each followed by the "
        "activation and BatchNorm. Global average pooling and a linear classifier finish the network.",
        "",
        "## Model details",
        "",
        f"- **Architecture:** `{variant.name}` (convmixer-timm / timm)",
        f"- **Hidden dimension h:** {arch.h}",
        f"- **Depth d:** {arch.d}",
        f"- **Depthwise kernel k:** {arch.k}",
        f"- **Patch size p:** {arch.p}",
        f"- **Activation:** {arch.act}",
        f"- **Input:** {arch.in_chans} x {height} x {width}",
        f"- **Classes:** {arch.num_classes}",
        f"- **Class names:** {class_names}",
        f"- **Global pooling:** {global_pool or 'none'}",
        f"- **Parameters:** {param_count:,}" + (f" ({param_count / 1e6:.2f}M)" if param_count >= 100_000 else ""),
    ]
    if macs is not None:
        lines.append(
            f"- **Compute at {height} x {width}:** {macs / 1e9:.4g} GMACs analytic ({macs:,} MACs; "
            f"= {2 * macs / 1e9:.4g} GFLOPs, 1 MAC = 2 FLOPs), counting the patch embedding, depthwise, "
            "pointwise and classifier layers; activations, BatchNorm and pooling are not counted")
    lines += [
        f"- **Training data set:** {_md(trained_on) if trained_on else 'not stated'}",
        "- **Paper:** [Patches Are All You Need?](https://arxiv.org/abs/2201.09792)",
        "- **Original code:** https://github.com/locuslab/convmixer",
        "- **Licence:** MIT",
        "",
        "## Accuracy",
        "",
    ]
    if numeric:
        source = metrics_note or "measured for the weights in this repository"
        where = f" on {_md(evaluated_on)}" if evaluated_on else ""
        lines += [f"Figures{where}, {source}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_md(name)} | {_fmt_metric(value)} |" for name, value in numeric.items()]
        lines.append("")
    if published and variant.top1 is not None:
        lines += [f"These are the published `{variant.name}` weights (identified by their SHA-256 digest). Their "
                  f"published top-1 on {variant.dataset}: {variant.top1:.2f} % (source: {variant.top1_source}); "
                  "it was not re-measured here.", ""]
    elif not numeric:
        lines += ["No accuracy is stated for these weights: none was measured or given when this folder was "
                  f"written, and they are not the published `{variant.name}` weights, so the published figures "
                  "do not apply to them.", ""]
    lines += [
        "## Usage",
        "",
        "With timm:",
        "",
        "```python",
        "import timm  # with convmixer-timm installed, importing timm registers the ConvMixer models",
        "import torch",
        "",
        f'model = timm.create_model("hf-hub:ORG/{code_name}", pretrained=True).eval()  # or "local-dir:PATH"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "with torch.no_grad():",
        "    logits = model(transform(image).unsqueeze(0))  # image: a PIL image",
        "```",
        "",
        "With Hugging Face transformers (its timm wrapper; convmixer-timm must be installed):",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("image-classification", model="ORG/{code_name}")  # or a local folder',
        "print(classifier(image))  # [{'label': ..., 'score': ...}, ...]",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
