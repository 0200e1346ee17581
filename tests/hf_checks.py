"""What "a Hub folder loads in Hugging Face transformers" means, checked against timm's own ``local-dir:`` load.

Shared by the tests of every writer of Hub folders (``save_hub_folder``, ``convert``, the demo, ``push``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image


def random_images(n: int, seed: int, size: tuple[int, int] = (45, 37)) -> list[Image.Image]:
    """RGB images of an odd size, so the image processor's resize and crop really run."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def assert_transformers_matches_timm(folder: str | Path, images: list[Image.Image]) -> list[list[dict]]:
    """Load ``folder`` with AutoModelForImageClassification, AutoImageProcessor and pipeline; compare with timm.

    Returns the pipeline's top-3 results for ``images``.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder = str(Path(folder).resolve())
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()

    wrapped, expected_state = model.timm_model.state_dict(), reference.state_dict()
    assert wrapped.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(wrapped[key], tensor), key

    # The processor is timm's own evaluation transform for the folder's preprocessing config. Like timm's
    # transform it takes the image's own mode, so RGB here: the pipeline converts what it opens to RGB itself.
    rgb = [image.convert("RGB") for image in images]
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reference))
    pixels = processor(rgb, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, torch.stack([timm_transform(image) for image in rgb]))

    with torch.no_grad():
        expected = reference(pixels)
        logits = model(pixel_values=pixels).logits
        # Bit-identical once the weights sit in memory of their own. As loaded, transformers leaves them inside
        # the safetensors buffer at addresses that are not 64-byte aligned, and the classifier's matrix-vector
        # product then sums in another order: the pre-logits stay bit-identical, the logits agree to float32
        # rounding.
        assert torch.equal(copy.deepcopy(model)(pixel_values=pixels).logits, expected)
        assert torch.equal(model.timm_model.forward_head(model.timm_model.forward_features(pixels), pre_logits=True),
                           reference.forward_head(reference.forward_features(pixels), pre_logits=True))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))

    classifier = pipeline("image-classification", model=folder)
    results = classifier(images, top_k=3)  # the images as given: grey ones too
    id2label = model.config.id2label
    for result, row in zip(results, logits, strict=True):
        top = row.softmax(-1).topk(3)
        assert [r["label"] for r in result] == [id2label[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([r["score"] for r in result], top.values.tolist(), rtol=1e-5)
    return results
