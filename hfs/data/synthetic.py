"""Procedurally generated, learnable face-like identities: training and tests need no downloads.

Each identity is a parameter vector (skin, hair, eyes, brows, nose, mouth, marks, a skin texture)
drawn near the prototype of its *cluster* (``cluster_size`` consecutive classes share one), so
some identities look alike and hard negatives matter, as with real faces. Its canonical
appearance (the *template*) is rendered once with vectorised numpy; every image is a perturbed
view of it: a random affine warp (shift, scale, rotation), a random background, colour jitter
and pixel noise. Everything is a pure function of ``(seed, class, view)``, so datasets generate
images on the fly and any process regenerates the same bytes.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from hfs.data.plan import LabelPlan, Regime

# Parameters of one identity: name -> (size, low, high). Values are drawn in [0, 1] and mapped.
_PARAMS: dict[str, tuple[int, float, float]] = {
    "face_center": (2, -0.06, 0.06), "face_radii": (2, 0.0, 1.0), "skin": (3, 0.25, 0.95),
    "hair": (3, 0.0, 0.7), "hairline": (1, -0.55, -0.25), "hair_wave": (3, 0.0, 1.0),
    "eye_pos": (2, 0.0, 1.0), "eye_size": (2, 0.045, 0.11), "eye_color": (3, 0.0, 0.6),
    "brow": (3, 0.0, 1.0), "nose": (3, 0.0, 1.0), "mouth": (4, 0.0, 1.0), "lips": (3, 0.3, 0.9),
    "marks": (18, 0.0, 1.0), "texture": (5, 0.0, 1.0),
}
_PARAM_SIZE = sum(size for size, _, _ in _PARAMS.values())
_EXTENT = 1.3  # the template covers [-1.3, 1.3]^2 so warped views never sample outside it
_TEMPLATE_RES = 80


@dataclass(frozen=True)
class ViewJitter:
    """How far one view strays from its identity's template (fractions of the half-width)."""

    shift: float = 0.06
    scale: float = 0.06
    rotation_deg: float = 10.0
    gain: float = 0.10
    bias: float = 0.05
    noise: float = 0.03


def _decode(vec: np.ndarray) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, (size, lo, hi) in _PARAMS.items():
        out[name] = lo + (hi - lo) * vec[pos:pos + size]
        pos += size
    return out


def _soft(x: np.ndarray, sharpness: float) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(x * sharpness)


def _blend(img: np.ndarray, alpha: np.ndarray, color) -> None:
    img += alpha[..., None] * (np.asarray(color, np.float32) - img)


def _blob(u, v, cx, cy, sx, sy, angle=0.0) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = u - cx, v - cy
    return np.exp(-0.5 * (((du * c + dv * s) / sx) ** 2 + ((dv * c - du * s) / sy) ** 2))


def render_template(vec: np.ndarray, res: int = _TEMPLATE_RES) -> np.ndarray:
    """The canonical face of one identity: (res, res, 4) float32 RGBA in [0, 1].

    Alpha marks face and hair; the background is filled per view.
    """
    p = _decode(vec.astype(np.float32))
    lin = ((np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1) * _EXTENT
    u, v = lin[None, :], lin[:, None]
    img = np.zeros((res, res, 3), np.float32)

    fx, fy = p["face_center"]
    rx, ry = 0.52 + 0.14 * p["face_radii"][0], 0.68 + 0.14 * p["face_radii"][1]
    face = _soft(1.0 - ((u - fx) / rx) ** 2 - ((v - fy) / ry) ** 2, 6.0)
    head = _soft(1.0 - ((u - fx) / (rx * 1.1)) ** 2 - ((v - fy + 0.05) / (ry * 1.08)) ** 2, 6.0)
    amp, freq, phase = 0.04 + 0.1 * p["hair_wave"][0], 4 + 10 * p["hair_wave"][1], 6.28 * p["hair_wave"][2]
    hairline = fy + p["hairline"][0] + amp * np.sin(freq * u + phase)
    hair = np.maximum(head * _soft(hairline - v, 12.0), head * (1 - face))

    t = p["texture"]
    angle = math.pi * t[2]
    wave = np.sin((4 + 14 * t[0]) * (u * math.cos(angle) + v * math.sin(angle)) + 6.28 * t[3])
    skin = np.asarray(p["skin"], np.float32) * (1.0 + (0.05 + 0.12 * t[1]) * wave[..., None])
    img += face[..., None] * skin
    _blend(img, hair, p["hair"])

    ex, ey = 0.16 + 0.12 * p["eye_pos"][0], fy - 0.2 + 0.15 * p["eye_pos"][1]
    esx, esy = p["eye_size"]
    b = p["brow"]
    for side in (-1.0, 1.0):
        _blend(img, 0.9 * _blob(u, v, fx + side * ex, ey, esx * 1.4, esy * 0.8), (0.95, 0.95, 0.95))
        _blend(img, 0.95 * _blob(u, v, fx + side * ex, ey, esx * 0.6, esy * 0.6), p["eye_color"])
        _blend(img, (0.5 + 0.45 * b[0]) * _blob(u, v, fx + side * ex, ey - 0.11 - 0.06 * b[1],
                                                0.07 + 0.05 * b[2], 0.018 + 0.02 * b[0], side * 0.25 * (b[1] - 0.5)),
               p["hair"] * 0.8)
    n = p["nose"]
    _blend(img, (0.35 + 0.3 * n[2]) * _blob(u, v, fx, fy + 0.03 + 0.05 * n[0], 0.04 + 0.04 * n[1], 0.1 + 0.06 * n[0]),
           np.asarray(p["skin"]) * 0.7)
    m = p["mouth"]
    _blend(img, 0.9 * _blob(u, v, fx + 0.04 * (m[3] - 0.5), fy + 0.3 + 0.1 * m[0], 0.1 + 0.1 * m[1],
                            0.025 + 0.035 * m[2]), p["lips"] * np.array([1.0, 0.55, 0.55], np.float32))
    marks = p["marks"].reshape(3, 6)
    for mark in marks:
        alpha = (0.3 + 0.6 * mark[5]) * face * _blob(u, v, fx + 0.8 * (mark[0] - 0.5) * 2 * rx,
                                                     fy + 0.7 * (mark[1] - 0.5) * 2 * ry,
                                                     0.03 + 0.09 * mark[2], 0.03 + 0.09 * mark[2])
        _blend(img, alpha, mark[3:6] * np.array([0.9, 0.7, 0.6], np.float32))
    alpha = np.maximum(face, hair)
    return np.concatenate([np.clip(img, 0, 1), alpha[..., None]], axis=2)


class SyntheticFaces:
    """The generator: identity parameters, cached templates, and perturbed views.

    ``image(cls, view)`` is a pure function of ``(seed, cls, view)``; the template cache only
    saves time. Classes ``c`` and ``c'`` are in the same cluster when ``c // cluster_size``
    agrees, and then look alike.
    """

    def __init__(self, seed: int = 0, image_size: int = 112, cluster_size: int = 8,
                 cluster_spread: float = 0.13, jitter: ViewJitter = ViewJitter(), cache_size: int = 2048) -> None:
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.cluster_size = max(1, int(cluster_size))
        self.cluster_spread = float(cluster_spread)
        self.jitter = jitter
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # rebuilt in each worker process
        return state

    def identity_vector(self, cls: int) -> np.ndarray:
        """Cluster prototype plus a per-identity offset, in [0, 1]^P."""
        proto = np.random.default_rng([self.seed, 1, cls // self.cluster_size]).random(_PARAM_SIZE)
        offset = np.random.default_rng([self.seed, 2, cls]).standard_normal(_PARAM_SIZE)
        return np.clip(proto + self.cluster_spread * offset, 0.0, 1.0)

    def template(self, cls: int) -> Image.Image:
        """RGBA template of one identity (cached, least recently used dropped first)."""
        img = self._cache.get(cls)
        if img is None:
            rgba = render_template(self.identity_vector(cls))
            img = Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), "RGBA")
            self._cache[cls] = img
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(cls)
        return img

    def image(self, cls: int, view: int) -> np.ndarray:
        """View ``view`` of identity ``cls``: (image_size, image_size, 3) uint8.

        Warp and compositing run inside PIL's C code; numpy adds colour jitter and noise.
        """
        rng = np.random.default_rng([self.seed, 3, cls, view])
        size, j = self.image_size, self.jitter
        face = self.template(cls).transform((size, size), Image.AFFINE, self._warp(rng), resample=Image.BILINEAR)
        img = Image.alpha_composite(self._background(rng, size), face).convert("RGB")
        gain = 1.0 + j.gain * rng.uniform(-1, 1) + 0.5 * j.gain * rng.uniform(-1, 1, 3)
        offset = 255.0 * j.bias * rng.uniform(-1, 1) + 0.5
        amp = j.noise * 255.0 * math.sqrt(3.0)  # uniform noise with std = jitter.noise
        arr = np.asarray(img, dtype=np.float32) * gain.astype(np.float32)
        arr += rng.random((size, size, 3), dtype=np.float32) * np.float32(2 * amp) + np.float32(offset - amp)
        return np.clip(arr, 0, 255, out=arr).astype(np.uint8)

    def _warp(self, rng: np.random.Generator) -> tuple[float, ...]:
        """PIL affine coefficients mapping output pixels to template pixels for a random view."""
        j, size = self.jitter, self.image_size
        angle = math.radians(j.rotation_deg) * rng.uniform(-1, 1)
        scale = 1.0 + j.scale * rng.uniform(-1, 1)
        tx, ty = j.shift * rng.uniform(-1, 1, 2)
        c, s = math.cos(angle) / scale, math.sin(angle) / scale
        k_out = 2.0 / size  # output pixel -> normalised coordinate
        k_in = _TEMPLATE_RES / (2.0 * _EXTENT)  # normalised coordinate -> template pixel
        # normalised: q = R(-angle)/scale @ (p - t); p = (x + 0.5) * k_out - 1
        a, b = c * k_out * k_in, s * k_out * k_in
        d, e = -s * k_out * k_in, c * k_out * k_in
        px0, py0 = 0.5 * k_out - 1 - tx, 0.5 * k_out - 1 - ty
        off_x = (c * px0 + s * py0) * k_in + _TEMPLATE_RES / 2
        off_y = (-s * px0 + c * py0) * k_in + _TEMPLATE_RES / 2
        return (a, b, off_x, d, e, off_y)

    @staticmethod
    def _background(rng: np.random.Generator, size: int) -> Image.Image:
        """A muted random two-colour gradient: a nuisance the model must learn to ignore."""
        c0, c1 = 0.25 + 0.5 * rng.random(3), 0.25 + 0.5 * rng.random(3)
        angle = rng.uniform(0, 2 * math.pi)
        lin = np.linspace(-1.0, 1.0, 4)
        t = np.clip(0.5 + 0.5 * (math.cos(angle) * lin[None, :] + math.sin(angle) * lin[:, None]), 0, 1)
        small = (255.0 * (c0 + (c1 - c0) * t[..., None]) + 0.5).astype(np.uint8)
        rgba = np.concatenate([small, np.full((4, 4, 1), 255, np.uint8)], axis=2)
        return Image.fromarray(rgba, "RGBA").resize((size, size), Image.BILINEAR)


# --------------------------------------------------------------------------- encoding


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {"jpeg": encode_jpeg, "png": encode_png}


def get_encoder(fmt: str) -> Callable[[np.ndarray], bytes]:
    from hfs.utils.errors import HfsError

    try:
        return _ENCODERS[fmt]
    except KeyError:
        raise HfsError(f"unknown image format '{fmt}'; choose one of {', '.join(_ENCODERS)}") from None


# --------------------------------------------------------------------------- dataset


class SyntheticIdentities:
    """A torch-style Dataset of synthetic identities, generated on the fly.

    ``split="train"`` holds views ``0..images_per_class-1`` of every class, ``split="val"``
    the next ``val_per_class`` views (same identities, unseen views). ``regime``
    (:class:`~hfs.data.plan.Regime`): duplicate labels, label noise, a long tail of images per
    class (:class:`~hfs.data.plan.LabelPlan`). Items are ``(float32 CxHxW tensor in [-1, 1],
    int label)``; training items get a random flip drawn from a generator seeded by (seed,
    index, epoch), so a run is reproducible.
    """

    def __init__(self, num_classes: int, images_per_class: int, image_size: int = 112, seed: int = 0,
                 split: str = "train", val_per_class: int = 2, cluster_size: int = 8, hflip: bool = True,
                 regime: Regime = Regime()) -> None:
        from hfs.data.transforms import EvalTransform, TrainTransform

        self.num_classes = int(num_classes)
        self.plan = LabelPlan(num_classes, images_per_class, regime, val_views=val_per_class, seed=seed)
        self.split = split
        self._size = self.plan.size(split)
        self.seed = int(seed)
        self.epoch = 0
        self.faces = SyntheticFaces(seed, image_size, cluster_size)
        self.transform = TrainTransform(image_size, hflip) if split == "train" else EvalTransform(image_size)

    def __len__(self) -> int:
        return self._size

    def set_epoch(self, epoch: int) -> None:
        """Vary the training augmentation between epochs (the images themselves stay fixed)."""
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        return self.plan.labels(self.split)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        identity, view, label = (int(a[0]) for a in self.plan.items(self.split, np.array([index])))
        img = Image.fromarray(self.faces.image(identity, view))
        if self.split == "train":
            return self.transform(img, np.random.default_rng([self.seed, 4, index, self.epoch])), label
        return self.transform(img), label


# --------------------------------------------------------------------------- writers


def write_synthetic_rec(out_folder: str | Path, num_classes: int, images_per_class: int, image_size: int = 112,
                        seed: int = 0, start_class: int = 0, fmt: str = "jpeg", cluster_size: int = 8,
                        on_image: Callable[[int], None] | None = None, regime: Regime = Regime()) -> dict[str, int]:
    """Write ``train.rec``/``train.idx``/``property`` (InsightFace layout) of synthetic identities.

    Label ``i`` holds generator class ``start_class + i``, views ``0..images_per_class-1`` (the
    same images ``SyntheticIdentities(split="train")`` yields); ``regime`` lays out duplicate
    labels, label noise and a long tail as :class:`~hfs.data.plan.LabelPlan` does. Returns
    counts for a summary.
    """
    from hfs.data.recordio import InsightFaceWriter, write_property

    encode = get_encoder(fmt)
    plan = LabelPlan(num_classes, images_per_class, regime, val_views=0, seed=seed)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    faces = SyntheticFaces(seed, image_size, cluster_size)
    total_bytes = 0
    identities, views, labels = plan.train_items(np.arange(plan.train_size))
    # records sorted by label, as a release lays them out: a mislabelled image sits among its label's images
    order = np.argsort(labels, kind="stable")
    identities, views, labels = identities[order], views[order], labels[order]
    with InsightFaceWriter(out / "train.rec", out / "train.idx") as writer:
        for identity, view, label in zip(identities.tolist(), views.tolist(), labels.tolist()):
            data = encode(faces.image(start_class + identity, view))
            writer.add(label, data)
            total_bytes += len(data)
            if on_image is not None:
                on_image(1)
    write_property(out / "property", num_classes, image_size, image_size)
    return {"images": plan.train_size, "identities": num_classes, "bytes": total_bytes}


def make_synthetic_rec(out_folder: str | Path, num_classes: int, images_per_class: int, image_size: int = 112,
                       seed: int = 0, start_class: int = 0, fmt: str = "jpeg", cluster_size: int = 8,
                       regime: Regime = Regime()) -> dict[str, float]:
    """:func:`write_synthetic_rec` with a progress bar and timing, for ``hfs make-synthetic``."""
    import time

    from hfs.utils.log import progress

    get_encoder(fmt)  # a bad format fails before the progress bar appears
    total = LabelPlan(num_classes, images_per_class, regime, val_views=0, seed=seed).train_size
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("generating", total=total, info="")
        stats = write_synthetic_rec(out_folder, num_classes, images_per_class, image_size, seed, start_class, fmt,
                                    cluster_size, on_image=lambda n: bar.advance(task, n), regime=regime)
    return {**stats, "seconds": time.perf_counter() - start}


def held_out_identities(classes: int, first_class: int = 0, val_first_class: int | None = None,
                        val_classes: int | None = None) -> tuple[int, int]:
    """(first generator identity, count) of ``make-synthetic --val-pairs``: by default the
    ``classes`` identities right after the training ones."""
    first = first_class + classes if val_first_class is None else val_first_class
    return first, classes if val_classes is None else val_classes


VERIFICATION_VIEW_OFFSET = 1_000_000  # verification views never coincide with training views


def synthetic_verification_pairs(num_pairs: int, first_class: int, num_classes: int, image_size: int = 112,
                                 seed: int = 0, fmt: str = "jpeg", cluster_size: int = 8,
                                 on_pair: Callable[[int], None] | None = None) -> tuple[list[bytes], np.ndarray]:
    """``2 * num_pairs`` encoded images and ``num_pairs`` issame flags over classes
    ``[first_class, first_class + num_classes)`` (keep them out of training).

    Half the pairs are positives (two views of one identity); half of the negatives pair an
    identity with another of its own cluster, the look-alikes that make verification hard.
    """
    from hfs.utils.errors import HfsError

    if num_classes < 2:
        raise HfsError("verification pairs need at least 2 identities")
    faces = SyntheticFaces(seed, image_size, cluster_size)
    encode = get_encoder(fmt)
    rng = np.random.default_rng([seed, 5, first_class, num_classes])
    issame = rng.permutation(np.arange(num_pairs) % 2 == 0)
    images: list[bytes] = []
    for i, same in enumerate(issame):
        a = first_class + int(rng.integers(num_classes))
        if same:
            b = a
        else:
            b = _negative_partner(a, first_class, num_classes, cluster_size, rng, hard=bool(rng.random() < 0.5))
        views = VERIFICATION_VIEW_OFFSET + 2 * i
        images.append(encode(faces.image(a, views)))
        images.append(encode(faces.image(b, views + 1)))
        if on_pair is not None:
            on_pair(1)
    return images, issame.astype(bool)


def write_synthetic_bin(path: str | Path, num_pairs: int, first_class: int, num_classes: int,
                        image_size: int = 112, seed: int = 0, fmt: str = "jpeg", cluster_size: int = 8) -> None:
    """A verification ``.bin`` (InsightFace format) of :func:`synthetic_verification_pairs`."""
    from hfs.data.bins import write_bin

    images, issame = synthetic_verification_pairs(num_pairs, first_class, num_classes, image_size, seed, fmt,
                                                  cluster_size)
    write_bin(path, images, issame)


def make_synthetic_bin(path: str | Path, num_pairs: int, first_class: int, num_classes: int,
                       image_size: int = 112, seed: int = 0, fmt: str = "jpeg", cluster_size: int = 8) -> None:
    """:func:`write_synthetic_bin` with a bar per phase (100K pairs take minutes), for ``hfs make-synthetic``."""
    from hfs.data.bins import write_bin
    from hfs.utils.log import progress

    get_encoder(fmt)
    with progress() as bar:
        task = bar.add_task("val pairs", total=num_pairs, info="")
        images, issame = synthetic_verification_pairs(num_pairs, first_class, num_classes, image_size, seed, fmt,
                                                      cluster_size, on_pair=lambda n: bar.advance(task, n))
        task = bar.add_task(f"writing {Path(path).name}", total=1, info=f"{sum(map(len, images)) / 1e6:.1f} MB")
        write_bin(path, images, issame)
        bar.advance(task)


def _negative_partner(a: int, first: int, count: int, cluster_size: int, rng: np.random.Generator,
                      hard: bool) -> int:
    if hard:
        lo = max(first, (a // cluster_size) * cluster_size)
        hi = min(first + count, lo + cluster_size)
        if hi - lo > 1:
            b = lo + int(rng.integers(hi - lo - 1))
            return b if b < a else b + 1
    b = first + int(rng.integers(count - 1))
    return b if b < a else b + 1
