"""Evaluation images for image classifiers: real photographs shipped inside an installed package, preprocessed by the
model's own image processor.

The photographs are scikit-image's bundled sample data (`skimage/data/`, in the wheel itself: astronaut, cat, coffee,
rocket, motorcycle, Hubble deep field, microscopy, textures; nothing is downloaded: the files are read straight from
the package folder, never through `skimage.data`'s fetchers), each also mirrored left-right, so 32 inputs. They are
resized and normalised by the model's image-processor config: `preprocessor_config.json` beside the weights (or
uploaded with them) when there is one, else the model_type's default processor at the config's `image_size`.
Without scikit-image the inputs are seeded random pixels, and the source line says so.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_PACKAGE = "scikit-image"
PREPROCESSOR_FILE = "preprocessor_config.json"
PHOTOGRAPHS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png", "moon.png", "coins.png",
               "brick.png", "grass.png", "gravel.png", "cell.png", "clock_motion.png")
RANDOM_IMAGES = 16  # without scikit-image


@dataclass
class EvalImages:
    """Fixed evaluation inputs of an image classifier."""

    pixel_values: torch.Tensor  # (N, 3, H, W) float32, as the model's processor makes them
    source: str  # one line: where the images come from and how they were preprocessed
    notes: list[str] = field(default_factory=list)


def image_size(hf_config) -> tuple[int, int]:
    """(H, W) the config expects (`image_size`, an int or a pair; 224 when it records none)."""
    size = getattr(hf_config, "image_size", None) or 224
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, dict):
        return int(size.get("height", 224)), int(size.get("width", 224))
    return int(size), int(size)


def photograph_folder() -> Path | None:
    """scikit-image's bundled data folder, found without importing the package; None when it is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def photographs() -> list:
    """The bundled photographs as RGB PIL images, each followed by its mirror image (empty without the package)."""
    from PIL import Image, ImageOps

    folder = photograph_folder()
    images = []
    for name in PHOTOGRAPHS if folder is not None else ():
        path = folder / name
        if not path.is_file():
            continue
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        images += [rgb, ImageOps.mirror(rgb)]
    return images


def image_processors(preprocessor: bytes | None, hf_config, notes: list[str]) -> list[tuple[object, str]]:
    """[(processor, description)]: from `preprocessor` (the bytes of the preprocessor_config.json beside the weights
    or uploaded with them), else the model_type's default processor with the config's image size in the forms
    processors take (the first whose output fits is used). The PIL backend is preferred (no torchvision needed).
    What the user should know is appended to `notes`."""
    from transformers.models.auto import image_processing_auto as auto

    settings = None
    if preprocessor is not None:
        with contextlib.suppress(ValueError, RecursionError):
            settings = json.loads(preprocessor.decode("utf-8", errors="replace"))
        if not isinstance(settings, dict):
            settings = None
            notes.append(f"{PREPROCESSOR_FILE} is not a JSON object: the model type's default processor is used")
    backends = auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""), {}) or {}
    name = (settings or {}).get("image_processor_type") if isinstance(settings, dict) else None
    candidates = [f"{name.removesuffix('Fast')}Pil", name] if isinstance(name, str) else []
    candidates += [backends.get("pil"), backends.get("torchvision")]
    cls = None
    for candidate in candidates:
        if candidate:
            cls = auto.get_image_processor_class_from_name(candidate)
            if cls is not None:
                break
    if cls is None:
        raise ValueError(f"no image processor for model_type {getattr(hf_config, 'model_type', None)!r}")
    if isinstance(settings, dict):
        return [(cls.from_dict(settings), f"{PREPROCESSOR_FILE} ({cls.__name__})")]
    height, width = image_size(hf_config)
    how = f"{cls.__name__} defaults at {height}x{width}"
    sizes = ({"size": {"height": height, "width": width}},  # ViT-like processors: resize to the model's input
             {"size": {"shortest_edge": height}, "crop_size": {"height": height, "width": width}},  # resize + crop
             {})
    return [(cls(**kwargs), how) for kwargs in sizes]


def evaluation_images(preprocessor: bytes | None, hf_config) -> EvalImages:
    """The fixed evaluation batch of an image classifier (see the module docstring)."""
    notes = []
    images = photographs()
    height, width = image_size(hf_config)
    channels = int(getattr(hf_config, "num_channels", 3) or 3)
    if images:
        try:
            shapes = []
            for processor, how in image_processors(preprocessor, hf_config, notes):
                try:
                    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
                except (TypeError, ValueError, KeyError, AttributeError):
                    continue  # size settings this processor does not take: the next ones
                if tuple(pixels.shape[1:]) == (channels, height, width):
                    return EvalImages(pixels, f"{len(images)} photographs bundled with {IMAGE_PACKAGE} "
                                              f"({len(images) // 2} and their mirror images), preprocessed by {how}",
                                      notes)
                shapes.append(tuple(pixels.shape[1:]))
            notes.append(f"the image processor makes {shapes[0] if shapes else 'no'} inputs but the model takes "
                         f"{(channels, height, width)}: random pixels used instead")
        except Exception as e:  # noqa: BLE001 - a broken preprocessor config costs the real images, not the model
            notes.append(f"image preprocessing failed ({' '.join(str(e).split())[:160]}): random pixels used")
    else:
        notes.append(f"no evaluation photographs ({IMAGE_PACKAGE} is not installed: pip install scikit-image); "
                     "random pixels used")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn((RANDOM_IMAGES, channels, height, width), generator=g)
    return EvalImages(pixels, f"{RANDOM_IMAGES} images of seeded random pixels (seed 0)", notes)
