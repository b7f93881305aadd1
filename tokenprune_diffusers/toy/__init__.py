"""A tiny trained text-to-image model on compositional shape prompts, shipped with the package.

    >>> from tokenprune_diffusers.toy import load_toy_pipeline
    >>> pipe = load_toy_pipeline()  # a standard StableDiffusionPipeline, offline
    >>> image = pipe("a small red circle on the left and a large blue square on the right").images[0]

- :mod:`.data`: the procedural, seeded captioned-shapes data set (32x32 images);
- :mod:`.checker`: the analytic prompt-adherence checker (colour segmentation and geometry);
- :mod:`.model`: the networks, pipeline assembly, and safetensors save / load;
- :mod:`.train`: the seeded, resumable training script;
- :mod:`.evaluate`: adherence stock and under token pruning, as a markdown table.

Only :mod:`.data` and :mod:`.checker` are imported eagerly; the rest imports diffusers on use.
"""

from __future__ import annotations

from .checker import check_image, parse_caption, score_images
from .data import ToyObject, ToySample, ToyShapesDataset

__all__ = [
    "ToyObject",
    "ToySample",
    "ToyShapesDataset",
    "check_image",
    "parse_caption",
    "score_images",
    "load_toy_pipeline",
    "ToyModelConfig",
]


def __getattr__(name: str):
    if name in ("load_toy_pipeline", "ToyModelConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
