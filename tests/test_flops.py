"""Analytic MACs (used in docs and model cards) agree with a counter that sees every convolution and matmul.

timm's and mmpretrain's published GMACs for ConvMixer leave out the depthwise convolutions; the analytic
formula includes them, and PyTorch's FlopCounterMode (2 FLOPs per MAC) confirms it for every variant.
"""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from convmixer_timm import VARIANTS
from convmixer_timm.models.variants import markdown_table


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_analytic_macs_match_counted_flops(variant):
    model = timm.create_model(variant.name, device="meta").eval()
    x = torch.empty(1, 3, variant.img_size, variant.img_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    grid = variant.img_size // variant.p
    # Even kernels run with symmetric padding and drop the first output row and column (no padded copy of the
    # input, and no padding="same" warning): the counter sees that extra row and column of depthwise work.
    cropped = variant.d * variant.h * variant.k ** 2 * ((grid + 1) ** 2 - grid ** 2) if variant.k % 2 == 0 else 0
    assert counter.get_total_flops() == 2 * (variant.macs() + cropped)
    depthwise = variant.d * grid ** 2 * variant.h * variant.k ** 2
    assert variant.macs() - depthwise > 0  # the depthwise term is part of the figure, not left out


def test_published_gmacs_figures():
    gmacs = {v.name: round(v.macs() / 1e9, 2) for v in VARIANTS}
    assert gmacs["convmixer_1536_20"] == 51.10
    assert gmacs["convmixer_768_32"] == 20.68
    assert gmacs["convmixer_1024_20_ks9_p14"] == 5.95


def test_readme_variant_table_is_generated_from_the_table():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert markdown_table() in readme.read_text()
