"""The ConvMixer zoo as data: one row per published variant.

Everything else (timm registration, pretrained configs, the CLI listing, the README table, tests) reads
``VARIANTS``; adding a row here is all it takes to add a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# Pretrained-config fields shared by every variant trained on a data set (timm's ``_cfg`` convention).
DATASET_CONFIGS: dict[str, dict[str, Any]] = {
    "imagenet-1k": dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.96, interpolation="bicubic",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "cifar-10": dict(
        num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0, interpolation="bicubic",
        mean=CIFAR10_MEAN, std=CIFAR10_STD,
    ),
}


@dataclass(frozen=True)
class Variant:
    """One published ConvMixer: ``h``/``d``/``k``/``p`` are the paper's hidden dim, depth, kernel and patch."""

    name: str
    h: int
    d: int
    k: int
    p: int
    act: str
    dataset: str
    top1: float | None = None
    top1_source: str = ""
    weights_tag: str | None = None  # timm pretrained tag; set only where published weights exist
    # ``convmixer_timm.hub.weights_sha256`` of the published weights (timm layout). A model card quotes ``top1``
    # and ``dataset`` only for weights with one of these digests: the same architecture with other weights
    # (random, fine-tuned, someone's own run) has no published accuracy.
    published_sha256: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return DATASET_CONFIGS[self.dataset]["num_classes"]

    @property
    def img_size(self) -> int:
        return DATASET_CONFIGS[self.dataset]["input_size"][-1]

    @property
    def hf_hub_id(self) -> str | None:
        return f"timm/{self.name}.{self.weights_tag}" if self.weights_tag else None

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments of :class:`ConvMixer`, JSON-serialisable as timm's ``config.json`` needs.

        ``num_classes`` is left out: timm takes it from the pretrained config unless the caller overrides it.
        """
        return dict(dim=self.h, depth=self.d, kernel_size=self.k, patch_size=self.p, act_layer=self.act)

    def param_count(self, in_chans: int = 3, num_classes: int | None = None) -> int:
        """Exact parameter count from the paper's architecture (every conv has a bias, BN has 2 per channel)."""
        n = self.num_classes if num_classes is None else num_classes
        h, d, k, p = self.h, self.d, self.k, self.p
        return h * (d * (k * k + h + 6) + in_chans * p * p + n + 3) + n

    def macs(self, img_size: int | None = None, in_chans: int = 3, num_classes: int | None = None) -> int:
        """Analytic multiply-accumulates: patch embedding + depthwise + pointwise + classifier."""
        s = self.img_size if img_size is None else img_size
        n = self.num_classes if num_classes is None else num_classes
        g = s // self.p
        h, k = self.h, self.k
        return g * g * h * in_chans * self.p * self.p + self.d * g * g * (h * k * k + h * h) + h * n


VARIANTS: tuple[Variant, ...] = (
    # ImageNet-1k, 224 px. Weights: the authors' release, republished by timm on the Hugging Face Hub.
    Variant("convmixer_1536_20", 1536, 20, 9, 7, "gelu", "imagenet-1k", 81.37, "paper / timm", "in1k"),
    Variant("convmixer_768_32", 768, 32, 7, 7, "relu", "imagenet-1k", 80.16, "paper / timm", "in1k"),
    Variant("convmixer_1024_20_ks9_p14", 1024, 20, 9, 14, "gelu", "imagenet-1k", 76.94, "paper / timm", "in1k"),
    # ImageNet-1k, paper rows without released weights (k=8 inferred from the published parameter counts).
    Variant("convmixer_512_16_ks8_p7", 512, 16, 8, 7, "gelu", "imagenet-1k", 73.8, "paper (second-hand)"),
    Variant("convmixer_1024_12_ks8_p7", 1024, 12, 8, 7, "gelu", "imagenet-1k", 77.8, "paper (second-hand)"),
    # CIFAR-10, 32 px.
    Variant("convmixer_256_8_ks5_p2", 256, 8, 5, 2, "gelu", "cifar-10", 92.60,
            "locuslab/convmixer-cifar10, 25 epochs"),
    Variant("convmixer_256_8_ks7_p2", 256, 8, 7, 2, "gelu", "cifar-10", None, "labml.ai (none reported)"),
    Variant("convmixer_256_8_ks9_p1", 256, 8, 9, 1, "gelu", "cifar-10", 95.88, "paper ablation (second-hand)"),
    Variant("convmixer_256_16_ks9_p1", 256, 16, 9, 1, "gelu", "cifar-10", 96.03, "locuslab/convmixer#15"),
)

VARIANTS_BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}


def find_variant(h: int, d: int, k: int, p: int) -> Variant | None:
    """The published variant with this hidden dim, depth, kernel and patch, if there is one."""
    return next((v for v in VARIANTS if (v.h, v.d, v.k, v.p) == (h, d, k, p)), None)


def get_variant(name: str) -> Variant:
    """Look up a variant by model name (a ``.tag`` suffix is ignored), naming the nearest ones if unknown."""
    import difflib

    base = name.split(".", 1)[0]
    if base in VARIANTS_BY_NAME:
        return VARIANTS_BY_NAME[base]
    nearest = difflib.get_close_matches(base, list(VARIANTS_BY_NAME), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(nearest)}?" if nearest else ""
    raise KeyError(
        f"unknown ConvMixer variant {name!r}.{hint} Known: {', '.join(VARIANTS_BY_NAME)} "
        "(`convmixer-timm list` shows them all)."
    )


def zoo_rows() -> list[dict[str, Any]]:
    """The zoo as plain records (the CLI's ``list --json`` and the README table are made from these)."""
    return [
        dict(
            name=v.name, h=v.h, d=v.d, k=v.k, p=v.p, act=v.act, dataset=v.dataset, img_size=v.img_size,
            num_classes=v.num_classes, params=v.param_count(), gmacs=round(v.macs() / 1e9, 3),
            top1=v.top1, top1_source=v.top1_source, weights=v.hf_hub_id,
        )
        for v in VARIANTS
    ]


def markdown_table() -> str:
    """The zoo as a Markdown table, as in the README."""
    lines = [
        "| model | h | d | k | p | act | data (px) | params | GMACs | top-1 (source) | weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in zoo_rows():
        top1 = f"{r['top1']:.2f} ({r['top1_source']})" if r["top1"] is not None else f"- ({r['top1_source']})"
        weights = f"`hf-hub:{r['weights']}`" if r["weights"] else "none"
        lines.append(
            f"| `{r['name']}` | {r['h']} | {r['d']} | {r['k']} | {r['p']} | {r['act'].upper()} | "
            f"{r['dataset']} ({r['img_size']}) | {r['params'] / 1e6:.2f}M | {r['gmacs']:.2f} | {top1} | {weights} |"
        )
    return "\n".join(lines)
