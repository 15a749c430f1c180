"""A small IJB-B/IJB-C release, generated: meta files, loose crops with landmarks, template pairs.

Faces are synthetic identities (:class:`hfs.data.synthetic.SyntheticFaces`) drawn as aligned
112x112 crops, then placed into a larger "loose crop" by a random similarity transform; the
landmark file holds the reference landmarks moved by that transform, so aligning a loose crop
should give the aligned face back. The template structure follows the real sets: several
templates per subject, several media per template (shared between templates of one subject),
several frames per media; every pair of templates is listed, label 1 for the same subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np


@dataclass
class IjbToy:
    root: Path
    target: str
    names: list[str]
    subjects: np.ndarray    # (N,) subject of each face-file row
    templates: np.ndarray   # (N,)
    medias: np.ndarray      # (N,)
    scores: np.ndarray      # (N,) detection scores
    landmarks: np.ndarray   # (N, 5, 2) in loose-crop pixels
    placements: list        # (N,) 3x3 matrices: aligned-crop pixel -> loose-crop pixel
    pairs: np.ndarray       # (P, 3): template 1, template 2, label

    @property
    def prefix(self) -> str:
        return self.target.lower()

    def meta(self, kind: str) -> Path:
        return self.root / "meta" / f"{self.prefix}_{kind}.txt"


def make_ijb(root: Path, target: str = "IJBC", subjects: int = 12, templates_per_subject: int = 3,
             seed: int = 0, images: bool = False, canvas: int = 150) -> IjbToy:
    """Write the layout under ``root``; ``images=True`` also renders the JPEG loose crops (needs scikit-image)."""
    from hfs.eval.align import REFERENCE_LANDMARKS_112

    rng = np.random.default_rng(seed)
    names, subj, tids, mids = [], [], [], []
    template_subject = {}
    for s in range(subjects):
        media_pool = [1000 + 10 * s + m for m in range(4)]  # media ids shared by this subject's templates
        for k in range(templates_per_subject):
            tid = 7 + 5 * (s * templates_per_subject + k)   # sparse, not 0-based
            template_subject[tid] = s
            for media in rng.choice(media_pool, size=int(rng.integers(1, 4)), replace=False):
                for frame in range(int(rng.integers(1, 4))):
                    names.append(f"{len(names)}.jpg")
                    subj.append(s)
                    tids.append(tid)
                    mids.append(int(media))
    n = len(names)
    scores = rng.uniform(0.4, 1.0, n).astype(np.float32)
    placements = [_random_placement(rng, canvas) for _ in range(n)]
    ref = np.c_[REFERENCE_LANDMARKS_112, np.ones(5)]
    landmarks = np.stack([(p @ ref.T).T[:, :2] for p in placements]).astype(np.float32)
    ids = sorted(template_subject)
    pairs = np.array([(a, b, int(template_subject[a] == template_subject[b])) for a, b in combinations(ids, 2)],
                     dtype=np.int64)
    pairs = pairs[rng.permutation(len(pairs))]

    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    prefix = target.lower()
    (meta / f"{prefix}_face_tid_mid.txt").write_text(
        "".join(f"{name} {t} {m}\n" for name, t, m in zip(names, tids, mids)))
    (meta / f"{prefix}_name_5pts_score.txt").write_text("".join(
        f"{name} {' '.join(f'{v:.2f}' for v in lm.reshape(-1))} {sc:.6f}\n"
        for name, lm, sc in zip(names, landmarks, scores)))
    (meta / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    toy = IjbToy(root, target, names, np.array(subj), np.array(tids, np.int64), np.array(mids, np.int64),
                 # the file rounds: read the values back as the command will see them
                 np.array([float(f"{s:.6f}") for s in scores], np.float32),
                 np.round(landmarks.astype(np.float64), 2), placements, pairs)
    if images:
        _render_loose_crops(toy, canvas, seed)
    return toy


def _random_placement(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A similarity transform (rotation, scale, shift) putting a 112x112 crop inside the canvas."""
    angle = np.radians(rng.uniform(-20, 20))
    scale = rng.uniform(0.85, 1.15)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    centre_in = np.array([55.5, 55.5])
    centre_out = np.array([canvas / 2 - 0.5, canvas / 2 - 0.5]) + rng.uniform(-8, 8, 2)
    rot = np.array([[c, -s], [s, c]])
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = centre_out - rot @ centre_in
    return m


def aligned_face(toy: IjbToy, row: int, seed: int = 0) -> np.ndarray:
    """The 112x112 face behind row ``row`` (what alignment should recover)."""
    from hfs.data.synthetic import SyntheticFaces

    return SyntheticFaces(seed, 112).image(int(toy.subjects[row]), row)


def _render_loose_crops(toy: IjbToy, canvas: int, seed: int) -> None:
    """Warp each aligned face into its canvas with scikit-image (not the code under test)."""
    from PIL import Image
    from skimage.transform import AffineTransform, warp

    out = toy.root / "loose_crop"
    out.mkdir(parents=True, exist_ok=True)
    for row, name in enumerate(toy.names):
        face = aligned_face(toy, row, seed)
        # warp() wants the map from output (loose) pixels to input (aligned) pixels
        loose = warp(face, AffineTransform(matrix=np.linalg.inv(toy.placements[row])), output_shape=(canvas, canvas),
                     order=1, mode="constant", cval=0, preserve_range=True)
        Image.fromarray(np.clip(loose + 0.5, 0, 255).astype(np.uint8)).save(out / name, quality=95)
