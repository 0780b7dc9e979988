"""Image files -> pixel arrays for a vision tower, as CLIPImageProcessor prepares them, in numpy + Pillow.

Runtimes without transformers (ONNX Runtime on a target) must feed the vision graph the same pixels
the reference did. The steps follow CLIPImageProcessor (preprocessor_config.json): convert to RGB;
resize so the shortest edge is `size.shortest_edge` (bicubic, the longer edge rounded as
transformers rounds it); center-crop to `crop_size`; x * rescale_factor; (x - mean) / std per
channel; channels first. Checked against CLIPImageProcessor in tests/test_vlm_runtimes.py.

Images are untrusted input: Pillow's decompression-bomb guard stays on, and a file that is missing
or is not an image raises RuntimeLoadError with one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.results import RuntimeLoadError
from toolkit.core.vision import PROCESSOR_FILE

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused rather than decoded (about 256 MB as RGB)


def read_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor settings beside a model (preprocessor_config.json); RuntimeLoadError if absent or broken."""
    path = Path(folder) / PROCESSOR_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeLoadError(
            f"{folder}: no {PROCESSOR_FILE} (the image processor of the vision tower): copy it from the checkpoint"
        ) from None
    except (OSError, ValueError) as error:
        raise RuntimeLoadError(f"{path}: not a valid processor config ({error})") from None
    if not isinstance(config, dict):
        raise RuntimeLoadError(f"{path}: not a valid processor config (not a JSON object)")
    return config


def open_rgb(path: str | Path) -> Any:
    """The image at `path` as an RGB Pillow image; RuntimeLoadError with one line when it cannot be one."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    path = Path(path)
    if not path.is_file():
        raise RuntimeLoadError(f"image '{path}' not found: pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else str(error)
        raise RuntimeLoadError(f"image '{path}' cannot be read: {reason}; pass a PNG or JPEG file") from None


def _size_pair(value: Any, default: int) -> tuple[int, int]:
    """(height, width) from a processor's size / crop_size entry (an int or a dict)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            edge = int(value["shortest_edge"])
            return edge, edge
    return default, default


def _resized_shape(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output (height, width) keeping the aspect ratio with the shortest edge = `shortest` (transformers' rule)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if height <= width else (new_long, shortest)


def preprocess(image: Any, config: dict[str, Any]) -> np.ndarray:
    """One RGB Pillow image -> float32 pixels [1, 3, H, W] as the processor `config` describes."""
    from PIL import Image

    if config.get("do_resize", True):
        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, dict) and "shortest_edge" in size:
            height, width = _resized_shape(image.height, image.width, int(size["shortest_edge"]))
        else:
            height, width = _size_pair(size, 224)
        image = image.resize((width, height), resample=Image.Resampling(int(config.get("resample", 3))))
    pixels = np.asarray(image, dtype=np.float32)
    if config.get("do_center_crop", True):
        crop_h, crop_w = _size_pair(config.get("crop_size", 224), 224)
        top = max((pixels.shape[0] - crop_h) // 2, 0)
        left = max((pixels.shape[1] - crop_w) // 2, 0)
        pixels = pixels[top : top + crop_h, left : left + crop_w]
    if config.get("do_rescale", True):
        pixels = pixels * np.float32(config.get("rescale_factor", 1 / 255))
    if config.get("do_normalize", True):
        mean = np.asarray(config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        std = np.asarray(config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def load_pixels(path: str | Path, config: dict[str, Any]) -> np.ndarray:
    """Read and preprocess the image file at `path`: float32 [1, 3, H, W]."""
    return preprocess(open_rgb(path), config)
