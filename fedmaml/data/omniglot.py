"""Omniglot from its standard on-disk layout: ``<path>/<alphabet>/<character>/<image>.png``.

That is the layout of the official ``images_background`` / ``images_evaluation`` folders (point
``data.path`` at one of them, or at a folder merging both). Every character is a class, numbered in
sorted (alphabet, character) order. Images (105x105 greyscale) are resized to 28x28 with Lanczos
filtering, as in Finn et al.'s MAML code, and inverted to [0, 1] with strokes = 1 and background = 0
(also as there), giving ``[n, 1, 28, 28]`` float32. Decoding tens of thousands of PNGs takes a while,
so the decoded arrays are cached in memory and on disk, keyed by the files' names, sizes and mtimes.
No rotation augmentation is applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmaml.errors import DataError

from .cache import cached_arrays, files_digest
from .pools import LabelledPool

IMAGE_SIZE = 28
LAYOUT = "<path>/<alphabet>/<character>/<image>.png"


def load_omniglot_pool(path: str) -> LabelledPool:
    """All characters under ``path`` as one pool, one class per character."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path = '{path}': Omniglot directory not found; expected {LAYOUT}")
    classes = scan_omniglot(root)
    files = [f for _, images in classes for f in images]
    key = {"files": files_digest(root, files), "size": IMAGE_SIZE}

    def build() -> dict[str, np.ndarray]:
        x = np.stack([read_image(f) for f in files])[:, None, :, :]
        counts = [len(images) for _, images in classes]
        y = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
        return {"x": x, "y": y}

    arrays = cached_arrays("omniglot", key, build)
    return LabelledPool.from_arrays(arrays["x"], arrays["y"], len(classes))


def scan_omniglot(root: Path) -> list[tuple[str, list[Path]]]:
    """``[("alphabet/character", [image files]), ...]`` in sorted order; layout problems raise."""
    alphabets = _subdirs(root)
    if not alphabets:
        raise DataError(f"{root}: no alphabet folders; expected {LAYOUT}")
    classes = []
    for alphabet in alphabets:
        characters = _subdirs(alphabet)
        if not characters:
            raise DataError(f"{alphabet}: empty alphabet (no character folders); expected {LAYOUT}")
        for character in characters:
            images = sorted(
                p for p in character.iterdir() if p.is_file() and p.suffix.lower() == ".png"
            )
            if not images:
                hint = ""
                if _subdirs(character):
                    hint = (f"; it holds folders, so data.path = '{root}' is probably one level too "
                            f"high (point it at e.g. images_background/)")
                raise DataError(f"{character}: no .png images; expected {LAYOUT}{hint}")
            classes.append((f"{alphabet.name}/{character.name}", images))
    return classes


def read_image(path: Path) -> np.ndarray:
    """One image as float32 ``[28, 28]`` in [0, 1], strokes = 1."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(f"data.family = 'omniglot' needs Pillow to read PNGs ({exc})") from exc
    try:
        with Image.open(path) as image:
            small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            pixels = np.asarray(small, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc}); expected a greyscale PNG") from exc
    return 1.0 - pixels


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
