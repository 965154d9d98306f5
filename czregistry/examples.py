"""A small, meaningful example model and image for the README's main job and for benchmarks.

The model is built with fixed weights instead of being trained (no data to ship, no hub to fetch):
a Gaussian blur followed by a per-pixel two-class softmax around a threshold. On the synthetic
"nuclei" image below it produces a sensible nucleus mask, so the side-by-side picture means something.
It expects normalised input, which is what the ``normalize`` preprocessing layer packed in front of it
provides: exactly the workflow of a real training script.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["EXAMPLE_CLASSES", "EXAMPLE_NORMALIZATION", "build_example_model", "synthetic_nuclei",
           "synthetic_nuclei_image"]

EXAMPLE_CLASSES = ["background", "nucleus"]
#: mean/std of the synthetic images in [0, 1] units; packed as ``normalize:mean=0.3,std=0.2``.
EXAMPLE_NORMALIZATION = {"mean": 0.3, "std": 0.2}
_BLUR_RADIUS = 3  # a 7x7 kernel: the model's halo is 3 px; the demo declares MinOverlap 8


def build_example_model(threshold: float = 0.5, sharpness: float = 4.0) -> Any:
    """A fully convolutional 1-channel -> 2-class Keras model with hand-set weights."""
    from ._quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras
    from keras import layers

    size = 2 * _BLUR_RADIUS + 1
    ax = np.arange(size) - _BLUR_RADIUS
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).astype("float32")
    inp = keras.Input((None, None, 1), name="image")
    blur = layers.Conv2D(1, size, padding="same", use_bias=False, name="blur")
    x = blur(inp)
    head = layers.Conv2D(2, 1, name="logits")
    logits = head(x)
    out = layers.Softmax(name="probabilities")(logits)
    model = keras.Model(inp, out, name="example_nuclei")
    blur.set_weights([g[:, :, None, None]])
    head.set_weights([np.array([[[[-sharpness, sharpness]]]], dtype="float32"),
                      np.array([sharpness * threshold, -sharpness * threshold], dtype="float32")])
    return model


def synthetic_nuclei_image(height: int, width: int, *, seed: int = 0, n_nuclei: int | None = None,
                           dtype: str = "uint8") -> np.ndarray:
    """Bright elliptical blobs on a dim, noisy background, ``[h, w]``; built in row strips so a
    16k x 16k image costs a few strips of float memory, not the whole image in float64."""
    return synthetic_nuclei(height, width, seed=seed, n_nuclei=n_nuclei, dtype=dtype)[0]


def synthetic_nuclei(height: int, width: int, *, seed: int = 0, n_nuclei: int | None = None,
                     dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """``synthetic_nuclei_image`` and its ground truth: a uint8 class map (0 background, 1 nucleus: inside
    any ellipse), for ``czreg evaluate`` and the demo."""
    rng = np.random.default_rng(seed)
    n = n_nuclei if n_nuclei is not None else max(1, height * width // 2500)
    cy, cx = rng.uniform(0, height, n), rng.uniform(0, width, n)
    ry, rx = rng.uniform(6, 14, n), rng.uniform(6, 14, n)
    bright = rng.uniform(0.55, 0.9, n)
    scale = 255 if dtype == "uint8" else 65535
    out = np.empty((height, width), dtype=dtype)
    truth = np.zeros((height, width), dtype=np.uint8)
    strip = 512
    order = np.argsort(cy)
    cy, cx, ry, rx, bright = cy[order], cx[order], ry[order], rx[order], bright[order]
    xs = np.arange(width, dtype=np.float32)[None, :]
    for y0 in range(0, height, strip):
        y1 = min(height, y0 + strip)
        img = 0.1 + 0.03 * rng.standard_normal((y1 - y0, width)).astype(np.float32)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        lo, hi = np.searchsorted(cy, y0 - 15), np.searchsorted(cy, y1 + 15)
        for i in range(lo, hi):
            a0, a1 = max(y0, int(cy[i] - ry[i]) - 1), min(y1, int(cy[i] + ry[i]) + 2)
            b0, b1 = max(0, int(cx[i] - rx[i]) - 1), min(width, int(cx[i] + rx[i]) + 2)
            if a0 >= a1 or b0 >= b1:
                continue
            sub_y, sub_x = ys[a0 - y0:a1 - y0], xs[:, b0:b1]
            mask = ((sub_y - cy[i]) / ry[i]) ** 2 + ((sub_x - cx[i]) / rx[i]) ** 2 <= 1.0
            region = img[a0 - y0:a1 - y0, b0:b1]
            region[mask] = np.maximum(region[mask], bright[i])
            truth[a0:a1, b0:b1][mask] = 1
        out[y0:y1] = (np.clip(img, 0, 1) * scale).astype(dtype)
    return out, truth
