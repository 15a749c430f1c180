"""Five-point face alignment: a detector's landmarks -> the 112x112 crop face models are trained on.

The landmarks (left eye, right eye, nose tip, left and right mouth corner, in pixels of the
source image, pixel centres at integers as OpenCV counts them) are mapped onto the reference
positions ArcFace models expect by the least-squares similarity transform (rotation, uniform
scale, translation) that scikit-image estimates (Umeyama's method); PIL then resamples the
crop. scikit-image is the optional ``ijb`` extra, imported when a face is first aligned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from hfs.utils.optional import install_hint, require

ALIGNED_SIZE = 112

# Where the five landmarks sit in an aligned 112x112 crop (the ArcFace/InsightFace reference).
REFERENCE_LANDMARKS_112 = np.array([
    [38.2946, 51.6963],   # left eye
    [73.5318, 51.5014],   # right eye
    [56.0252, 71.7366],   # nose tip
    [41.5493, 92.3655],   # left mouth corner
    [70.7299, 92.2041],   # right mouth corner
], dtype=np.float64)


def require_skimage() -> Any:
    """``skimage.transform``, or a one-line error saying how to install the ``ijb`` extra."""
    require("skimage", "face alignment (hfs eval-ijb --checkpoint)", install_hint("scikit-image", "ijb"),
            "or pass precomputed --features")
    import skimage.transform

    return skimage.transform


def similarity_to_reference(landmarks: np.ndarray) -> np.ndarray:
    """The 3x3 matrix of the similarity transform taking ``landmarks`` (5, 2) onto the reference.

    Raises ValueError when the landmarks are degenerate (e.g. all in one point), so the caller
    can name the line they came from.
    """
    transform = require_skimage()
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        fitted = transform.SimilarityTransform.from_estimate(src, REFERENCE_LANDMARKS_112)
        ok = bool(fitted)
    else:  # pragma: no cover - older scikit-image
        fitted = transform.SimilarityTransform()
        ok = fitted.estimate(src, REFERENCE_LANDMARKS_112)
    matrix = np.asarray(getattr(fitted, "params", np.zeros((3, 3))), dtype=np.float64)
    if not ok or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise ValueError("the landmarks do not determine a similarity transform (degenerate points)")
    return matrix


def pil_affine_coefficients(matrix: np.ndarray) -> tuple[float, ...]:
    """PIL's AFFINE data for warping with ``matrix`` (source pixel -> crop pixel, OpenCV convention).

    PIL asks for the inverse map (crop -> source) in continuous coordinates, where pixel ``i``
    spans ``[i, i + 1]``; OpenCV's and the landmarks' convention puts its centre at ``i``. So the
    inverse is taken and shifted by half a pixel on both sides.
    """
    inverse = np.linalg.inv(matrix)
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    c += 0.5 - 0.5 * (a + b)
    f += 0.5 - 0.5 * (d + e)
    return (float(a), float(b), float(c), float(d), float(e), float(f))


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> Image.Image:
    """The aligned ``size`` x ``size`` RGB crop of ``image``; outside the source is black.

    The crop is made at 112x112 (the protocol's) and resized to ``size`` when that differs, so a
    model with another input size sees the same crop, downscaled with PIL's antialiasing.
    """
    coeffs = pil_affine_coefficients(similarity_to_reference(landmarks))
    crop = image.convert("RGB").transform((ALIGNED_SIZE, ALIGNED_SIZE), Image.AFFINE, coeffs,
                                          resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return crop if size == ALIGNED_SIZE else crop.resize((size, size), Image.BILINEAR)

