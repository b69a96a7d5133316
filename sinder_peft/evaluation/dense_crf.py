"""The dense-CRF refinement of CAUSE's cluster maps (its test-time post-processing, after Krähenbühl & Koltun's fully
connected CRF with Gaussian edge potentials), through `pydensecrf` (the `pydensecrf2` package, extra `crf`).

A pixel's unary term is minus the log of its cluster probabilities (clipped at 1e-5); two pairwise kernels pull
pixels towards the labels of pixels near them (a Gaussian of position, width 1 pixel, weight 3) and of pixels near
them and of similar colour (width 67 pixels and 3 colour levels, weight 4); 10 mean-field iterations. These are
CAUSE's settings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

POSITION_WEIGHT = 3.0
POSITION_SIGMA = 1.0
BILATERAL_WEIGHT = 4.0
BILATERAL_POSITION_SIGMA = 67.0
BILATERAL_COLOUR_SIGMA = 3.0
ITERATIONS = 10
SMALLEST_PROBABILITY = 1e-5
"""Probabilities are clipped here before their log is taken (as `pydensecrf.utils.unary_from_softmax`)."""

INSTALL_HINT = "pip install pydensecrf2 (or sinder-peft[crf])"


def load_dense_crf() -> Any:
    """Return the `pydensecrf.densecrf` module.

    Raises:
        ImportError: `pydensecrf` is not installed (the message says how to install it).
    """
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as error:
        raise ImportError(
            f"CAUSE's dense-CRF refinement (--cause-crf) needs pydensecrf: {INSTALL_HINT}, or pass --cause-crf false."
        ) from error
    return densecrf


def dense_crf_labels(picture: np.ndarray, log_probabilities: np.ndarray) -> np.ndarray:
    """Return the [H, W] int64 cluster of every pixel of one image after the dense CRF (the most probable one).

    A plain function of numpy arrays, so that a process pool can run it (`cause.cause_class_counts`).

    Args:
        picture: [H, W, 3] uint8 RGB pixels of the image as the model saw it.
        log_probabilities: [K, H, W] log cluster probabilities of every pixel (the unary term is their negation).

    Raises:
        ValueError: the picture and the probabilities differ in size.
        ImportError: as `load_dense_crf`.
    """
    densecrf = load_dense_crf()
    classes, height, width = log_probabilities.shape
    if picture.shape != (height, width, 3) or picture.dtype != np.uint8:
        raise ValueError(
            f"Need a uint8 picture of shape {(height, width, 3)}, got {picture.dtype} {tuple(picture.shape)}."
        )
    crf = densecrf.DenseCRF2D(width, height, classes)
    unary = np.minimum(-log_probabilities.astype(np.float32), -math.log(SMALLEST_PROBABILITY))
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(classes, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=POSITION_SIGMA, compat=POSITION_WEIGHT)
    crf.addPairwiseBilateral(
        sxy=BILATERAL_POSITION_SIGMA,
        srgb=BILATERAL_COLOUR_SIGMA,
        rgbim=np.array(picture, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf needs one
        compat=BILATERAL_WEIGHT,
    )
    refined = np.array(crf.inference(ITERATIONS), dtype=np.float32).reshape(classes, height, width)
    return refined.argmax(axis=0).astype(np.int64)
