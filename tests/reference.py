"""Independent references for parity tests, written from the papers' own code, not from the plugin.

``paper_convmixer`` is the authors' listing from "Patches Are All You Need?" (locuslab/convmixer), with the
activation made a parameter so the ReLU variant can be built too. ``LabmlConvMixer`` mirrors the module names of
the labml.ai annotated implementation, so its state dict has that layout.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def paper_convmixer(dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 1000,
                    act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                act(),
                nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, kernel_size=1),
            act(),
            nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )


class _PatchEmbeddings(nn.Module):
    def __init__(self, d_model: int, patch_size: int, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.conv(x)))


class _ConvMixerLayer(nn.Module):
    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        self.depth_wise_conv = nn.Conv2d(d_model, d_model, kernel_size=kernel_size, groups=d_model,
                                         padding=(kernel_size - 1) // 2)
        self.act = nn.GELU()
        self.norm1 = nn.BatchNorm2d(d_model)
        self.point_wise_conv = nn.Conv2d(d_model, d_model, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.act(self.depth_wise_conv(x)))
        return self.norm2(self.act(self.point_wise_conv(x)))


class _ClassificationHead(nn.Module):
    def __init__(self, d_model: int, n_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x)[:, :, 0, 0])


class LabmlConvMixer(nn.Module):
    """labml.ai's structure (odd kernels only, as there)."""

    def __init__(self, d_model: int, n_layers: int, kernel_size: int, patch_size: int, n_classes: int):
        super().__init__()
        self.patch_emb = _PatchEmbeddings(d_model, patch_size, 3)
        self.conv_mixer_layers = nn.ModuleList([_ConvMixerLayer(d_model, kernel_size) for _ in range(n_layers)])
        self.classification = _ClassificationHead(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_emb(x)
        for layer in self.conv_mixer_layers:
            x = layer(x)
        return self.classification(x)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so eval-mode parity tests mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def zip_bomb(path: Path, inflated: int) -> Path:
    """A zip laid out like torch.save's, whose data.pkl entry is ``inflated`` zero bytes, deflated."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data.pkl", "w", force_zip64=True) as entry:
            for _ in range(inflated // len(chunk)):
                entry.write(chunk)
    return path
