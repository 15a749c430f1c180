"""IJB-B / IJB-C 1:1 template verification (``hfs eval-ijb``), in bounded memory.

Reads the release layout InsightFace's IJB evaluation reads, under one root folder::

    meta/<set>_face_tid_mid.txt         image name, template id, media id (one face per line)
    meta/<set>_template_pair_label.txt  template 1, template 2, label (1 = same subject)
    meta/<set>_name_5pts_score.txt      image name, 10 landmark coordinates, detection score
    loose_crop/<image name>             the detector's loose crops

with ``<set>`` = ``ijbb`` or ``ijbc``. The protocol:

1. one embedding per line of the face file, from a checkpoint (aligned to 112x112 by the five
   landmarks, optionally plus the embedding of the mirrored crop) or from an ``.npy`` with one
   row per line;
2. each embedding L2-normalised (or kept as it is with ``keep_norm``, InsightFace's default,
   where the norm acts as a quality weight) and optionally multiplied by its detection score;
3. media pooling: the mean of a template's embeddings from one media (a video's frames, or a
   single still); template pooling: the sum of its media means, L2-normalised;
4. score = cosine of the two template features of a pair;
5. TAR at FAR 1e-6 .. 1e-1 from the exact ROC over all pairs, read off by one of two rules
   (``FAR_RULES``): ``nearest``, the ROC point whose FAR is nearest the target, as
   arcface_torch's ``eval_ijbc.py`` (and so the published IJB-B/C tables) reads it, or
   ``at-most``, the best TAR whose FAR does not exceed the target. Both are always computed.

Memory stays bounded for IJB-C (469K faces, 15.6M pairs): embeddings are pooled batch by
batch into a (templates x D) accumulator without keeping the (faces x D) matrix (step 3 equals
one weighted sum, weight 1 / faces of the row's media in its template); pairs are read and
scored chunk by chunk and only their float32 scores and labels are kept (5 bytes a pair); the
ROC is the staircase through the positives' scores (O(positives) points), counted against the
sorted impostor scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hfs.utils.atomic import atomic_write_text
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

TARGETS = {"IJBB": "ijbb", "IJBC": "ijbc"}
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: How a TAR is read off the ROC at a target FAR; the first is the default (published tables use it).
FAR_RULES = ("nearest", "at-most")
DEFAULT_PAIR_CHUNK = 200_000
_SCORE_BATCH_FLOATS = 1 << 22  # gathered template features per scoring step and side (16 MB)


# --------------------------------------------------------------------------- layout and meta files


@dataclass(frozen=True)
class IjbLayout:
    """Where one set's files are, under ``root`` (e.g. ``IJB_release/IJBC``)."""

    root: Path
    target: str

    @classmethod
    def resolve(cls, root: str | Path, target: str) -> "IjbLayout":
        key = target.upper()
        if key not in TARGETS:
            raise HfsError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
        root = Path(root)
        if not root.is_dir():
            raise HfsError(f"--root {root}: no such folder (expected the IJB release folder holding meta/)")
        return cls(root, key)

    @property
    def prefix(self) -> str:
        return TARGETS[self.target]

    @property
    def face_file(self) -> Path:
        return self.root / "meta" / f"{self.prefix}_face_tid_mid.txt"

    @property
    def pair_file(self) -> Path:
        return self.root / "meta" / f"{self.prefix}_template_pair_label.txt"

    @property
    def landmark_file(self) -> Path:
        return self.root / "meta" / f"{self.prefix}_name_5pts_score.txt"

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def _open_meta(path: Path):
    if not path.is_file():
        raise HfsError(f"{path}: meta file missing")
    # newline="": lines keep their \r\n, so their lengths add up to the file's size (the progress bar)
    return open(path, encoding="utf-8", errors="replace", newline="")


def _meta_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, whitespace-separated fields)`` of every non-blank line."""
    with _open_meta(path) as fh:
        for number, line in enumerate(fh, 1):
            tokens = line.split()
            if tokens:
                yield number, tokens


@dataclass
class FaceList:
    """The face file: one row per line, in order (rows of an ``.npy`` match these lines)."""

    names: list[str]
    templates: np.ndarray  # int64 (N,)
    medias: np.ndarray     # int64 (N,)

    def __len__(self) -> int:
        return len(self.names)


def _int_fields(tokens: Sequence[str], where: str, what: str) -> list[int]:
    try:
        return [int(t) for t in tokens]
    except ValueError:
        raise HfsError(f"{where}: {what} must be integers, got {' '.join(tokens)!r}") from None


def read_face_file(path: Path) -> FaceList:
    """``image_name template_id media_id`` per line; blank lines are skipped."""
    names, ids = [], []
    for number, tokens in _meta_lines(path):
        where = f"{path}:{number}"
        if len(tokens) != 3:
            raise HfsError(f"{where}: expected 'image template_id media_id', got {len(tokens)} fields")
        names.append(tokens[0])
        ids.append(_int_fields(tokens[1:], where, "template and media ids"))
    if not names:
        raise HfsError(f"{path}: no faces listed")
    arr = np.asarray(ids, dtype=np.int64)
    return FaceList(names, arr[:, 0].copy(), arr[:, 1].copy())


@dataclass
class LandmarkList:
    """The landmark file, row for row with the face file."""

    points: np.ndarray  # float32 (N, 5, 2), source-image pixels
    scores: np.ndarray  # float32 (N,), detection scores
    lines: np.ndarray   # int64 (N,), the line each row came from (for error messages)


def _landmark_values(tokens: list[str], where: str, expected_name: str, row: int) -> list[float]:
    """The 11 numbers of one landmark line (10 coordinates, the score), checked against the face file."""
    if len(tokens) != 12:
        raise HfsError(f"{where}: expected an image name, 10 landmark coordinates (5 points) and a "
                       f"score, got {max(len(tokens) - 2, 0)} coordinates")
    if tokens[0] != expected_name:
        raise HfsError(f"{where}: image {tokens[0]} where the face file's row {row + 1} is "
                       f"{expected_name} (the two files must list the same faces in order)")
    try:
        return [float(t) for t in tokens[1:]]
    except ValueError:
        raise HfsError(f"{where}: landmarks and score must be numbers") from None


def read_landmark_file(path: Path, faces: FaceList) -> LandmarkList:
    """``image_name x1 y1 ... x5 y5 score`` per line, naming the same images as the face file, in order."""
    values = np.empty((len(faces), 11), dtype=np.float64)
    lines = np.empty(len(faces), dtype=np.int64)
    row = 0
    for number, tokens in _meta_lines(path):
        if row >= len(faces):
            raise HfsError(f"{path}:{number}: more faces than the face file's {len(faces)}")
        values[row] = _landmark_values(tokens, f"{path}:{number}", faces.names[row], row)
        lines[row] = number
        row += 1
    if row != len(faces):
        raise HfsError(f"{path}: {row} faces, but the face file lists {len(faces)}")
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise HfsError(f"{path}:{lines[np.flatnonzero(bad)[0]]}: landmarks and score must be finite numbers")
    return LandmarkList(values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10].astype(np.float32), lines)


# --------------------------------------------------------------------------- template pooling


@dataclass
class TemplatePooling:
    """How rows pool into templates: each row's template index and its weight in that template.

    A template's feature is ``sum over its media of mean(rows of that media)``, which is
    ``sum over its rows of row / (rows sharing its template and media)``.
    """

    templates: np.ndarray     # sorted unique template ids (T,)
    row_template: np.ndarray  # (N,) index into ``templates``
    row_weight: np.ndarray    # (N,) float64

    @classmethod
    def from_faces(cls, faces: FaceList) -> "TemplatePooling":
        templates, row_template = np.unique(faces.templates, return_inverse=True)
        _, row_group, group_sizes = np.unique(np.stack([faces.templates, faces.medias], axis=1), axis=0,
                                              return_inverse=True, return_counts=True)
        weights = 1.0 / group_sizes[row_group.reshape(-1)]
        return cls(templates, row_template.reshape(-1).astype(np.int64), weights.astype(np.float64))


@dataclass
class ImageWeighting:
    """What happens to each row's embedding before pooling."""

    keep_norm: bool = False                 # False: L2-normalise every embedding first
    scores: np.ndarray | None = None        # detection scores to multiply by (score weighting)


class TemplateAccumulator:
    """Sums weighted embeddings into (templates x D) as batches arrive, in row order or not."""

    def __init__(self, pooling: TemplatePooling, weighting: ImageWeighting) -> None:
        self.pooling = pooling
        self.weighting = weighting
        self.sums: np.ndarray | None = None
        self.rows_added = 0

    def add(self, start: int, embeddings: np.ndarray) -> None:
        """Pool rows ``start .. start + len(embeddings)`` of the face file."""
        x = np.asarray(embeddings, dtype=np.float64)
        stop = start + len(x)
        if self.sums is None:
            self.sums = np.zeros((len(self.pooling.templates), x.shape[1]), dtype=np.float64)
        if not self.weighting.keep_norm:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1.0)
        weight = self.pooling.row_weight[start:stop]
        if self.weighting.scores is not None:
            weight = weight * self.weighting.scores[start:stop]
        x = x * weight[:, None]
        index = self.pooling.row_template[start:stop]
        order = np.argsort(index, kind="stable")
        index = index[order]
        starts = np.r_[0, np.flatnonzero(np.diff(index)) + 1]
        self.sums[index[starts]] += np.add.reduceat(x[order], starts, axis=0)
        self.rows_added += len(x)

    def features(self) -> np.ndarray:
        """L2-normalised float32 template features, rows in ``pooling.templates`` order."""
        if self.sums is None or self.rows_added != len(self.pooling.row_template):
            raise RuntimeError(f"pooled {self.rows_added} of {len(self.pooling.row_template)} rows")
        norms = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return (self.sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------- pairs


@dataclass
class PairScores:
    """One float32 score and one label per pair, in file order."""

    scores: np.ndarray  # float32 (P,)
    labels: np.ndarray  # bool (P,)


def _bad_pair_line(path: Path, first_line: int, lines: list[str]) -> HfsError:
    """The first malformed line of a chunk that the fast parser refused, as an error."""
    for offset, line in enumerate(lines):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{first_line + offset}"
        if len(tokens) != 3:
            return HfsError(f"{where}: expected 'template_1 template_2 label', got {len(tokens)} fields")
        _int_fields(tokens, where, "template ids and label")
    return HfsError(f"{path}:{first_line}: unreadable pair lines")


def _parse_pair_lines(path: Path, first_line: int, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n, 3) int64, line numbers (n,))`` of a block of lines; blank lines are skipped."""
    numbers = np.asarray([first_line + i for i, line in enumerate(lines) if line.strip()], dtype=np.int64)
    if not len(numbers):
        return np.empty((0, 3), dtype=np.int64), numbers
    try:
        ids = np.loadtxt(lines, dtype=np.int64, ndmin=2, comments=None)  # C speed: IJB-C has 15.6M lines
    except ValueError:
        raise _bad_pair_line(path, first_line, lines) from None
    if ids.shape != (len(numbers), 3):
        raise _bad_pair_line(path, first_line, lines)
    return ids, numbers


def iter_pair_chunks(path: Path, chunk_lines: int, on_bytes=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(ids (n, 3) int64, line numbers (n,))`` for ``chunk_lines`` lines at a time."""
    first_line = 1
    with _open_meta(path) as fh:
        while lines := [line for _, line in zip(range(chunk_lines), fh)]:
            if on_bytes is not None:
                on_bytes(sum(len(line) for line in lines))
            ids, numbers = _parse_pair_lines(path, first_line, lines)
            first_line += len(lines)
            if len(ids):
                yield ids, numbers


def template_rows(ids: np.ndarray, templates: np.ndarray, path: Path, numbers: np.ndarray) -> np.ndarray:
    """Row index of each template id in the sorted ``templates``, or an error naming the line."""
    rows = np.minimum(np.searchsorted(templates, ids), len(templates) - 1)
    missing = templates[rows] != ids
    if missing.any():
        line, column = (int(v[0]) for v in np.nonzero(missing))
        raise HfsError(f"{path}:{numbers[line]}: template {ids[line, column]} has no faces in the face file")
    return rows


def iter_pair_rows(path: Path, templates: np.ndarray, chunk_lines: int,
                   on_bytes=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield checked ``(template rows (n, 2), labels (n,) bool)`` chunk by chunk."""
    for ids, numbers in iter_pair_chunks(path, chunk_lines, on_bytes):
        bad_label = (ids[:, 2] != 0) & (ids[:, 2] != 1)
        if bad_label.any():
            first = int(np.flatnonzero(bad_label)[0])
            raise HfsError(f"{path}:{numbers[first]}: label must be 0 or 1, got {ids[first, 2]}")
        yield template_rows(ids[:, :2], templates, path, numbers), ids[:, 2] == 1


def _byte_bar(show_progress: bool, transient: bool = False):
    """A progress bar over a file's bytes, or a falsy no-op when hidden."""
    from hfs.eval.extract import _NoBar
    from hfs.utils.log import progress

    return progress(transient=transient) if show_progress else _NoBar()


def check_pair_file(path: Path, templates: np.ndarray, chunk_lines: int = DEFAULT_PAIR_CHUNK,
                    show_progress: bool = True) -> int:
    """Read the whole pair file once, before the long extraction, so a bad line fails early.

    Returns the number of pairs. Costs a few seconds on IJB-C's 15.6M lines and keeps nothing.
    """
    if not path.is_file():
        raise HfsError(f"{path}: meta file missing")
    count = 0
    with _byte_bar(show_progress, transient=True) as bar:
        task = bar.add_task("check pairs", total=path.stat().st_size, info=f"bytes of {path.name}") if bar else None
        advance = (lambda n: bar.advance(task, n)) if bar else None
        for rows, _ in iter_pair_rows(path, templates, chunk_lines, advance):
            count += len(rows)
    if count == 0:
        raise HfsError(f"{path}: no template pairs listed")
    return count


def score_pairs(path: Path, templates: np.ndarray, features: np.ndarray, chunk_lines: int = DEFAULT_PAIR_CHUNK,
                show_progress: bool = True) -> PairScores:
    """Cosine of the template features of every pair in the pair file, chunk by chunk."""
    step = max(1, _SCORE_BATCH_FLOATS // max(1, features.shape[1]))
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with _byte_bar(show_progress) as bar:
        task = bar.add_task("score pairs", total=path.stat().st_size, info=f"bytes of {path.name}") if bar else None
        advance = (lambda n: bar.advance(task, n)) if bar else None
        for rows, chunk_labels in iter_pair_rows(path, templates, chunk_lines, advance):
            chunk = np.empty(len(rows), dtype=np.float32)
            for a in range(0, len(rows), step):
                left, right = features[rows[a:a + step, 0]], features[rows[a:a + step, 1]]
                chunk[a:a + step] = np.einsum("ij,ij->i", left, right)
            scores.append(chunk)
            labels.append(chunk_labels)
    if not scores:
        raise HfsError(f"{path}: no template pairs listed")
    return PairScores(np.concatenate(scores), np.concatenate(labels))


# --------------------------------------------------------------------------- ROC and TAR@FAR


@dataclass
class ScoreRoc:
    """The exact ROC as a staircase; a pair is accepted when its score >= threshold."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    false_accepts: np.ndarray  # int64 counts behind fpr
    true_accepts: np.ndarray   # int64 counts behind tpr


def score_roc(scores: np.ndarray, labels: np.ndarray) -> ScoreRoc:
    """Every vertex of the ROC, found from the positives' distinct scores (O(positives) points).

    The true accept count only changes at a positive's score, so the curve is: for each distinct
    positive score ``p`` (falling), a horizontal run to "just above p" (all impostors above p
    accepted), then a step (diagonal when impostors tie with ``p``) to "at p".
    """
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = scores[labels], scores[~labels]  # copies: sorting them in place costs no more
    positives.sort()
    negatives.sort()
    n_pos, n_neg = len(positives), len(negatives)
    if n_pos == 0 or n_neg == 0:
        raise HfsError("the pair file needs both genuine (label 1) and impostor (label 0) pairs")
    distinct = np.unique(positives)[::-1]  # falling
    tp_at = n_pos - np.searchsorted(positives, distinct, side="left")
    fp_at = n_neg - np.searchsorted(negatives, distinct, side="left")
    fp_above = n_neg - np.searchsorted(negatives, distinct, side="right")
    tp_before = np.r_[0, tp_at[:-1]]
    above = np.nextafter(distinct, np.float32(np.inf))
    fp = np.r_[0, np.stack([fp_above, fp_at], 1).reshape(-1), n_neg]
    tp = np.r_[0, np.stack([tp_before, tp_at], 1).reshape(-1), n_pos]
    thresholds = np.r_[np.inf, np.stack([above, distinct], 1).reshape(-1), -np.inf]
    return ScoreRoc(fp / n_neg, tp / n_pos, thresholds, fp.astype(np.int64), tp.astype(np.int64))


def roc_auc(roc: ScoreRoc) -> float:
    """Area under the staircase (ties count half: their segments are diagonal)."""
    return float(np.trapezoid(roc.tpr, roc.fpr)) if hasattr(np, "trapezoid") else float(np.trapz(roc.tpr, roc.fpr))


@dataclass
class TarAtFar:
    """The true accept rate at one target false accept rate, read off the ROC by ``rule``."""

    far_target: float
    tar: float
    far: float                 # the false accept rate of the point read (at-most: <= far_target; nearest: either side)
    threshold: float | None    # accept score >= threshold; None: no threshold accepts a genuine pair
    resolvable: bool           # False when impostors < 1 / far_target: then this is TAR at zero false accepts
    rule: str                  # one of FAR_RULES

    def to_dict(self) -> dict[str, Any]:
        return {"far_target": self.far_target, "tar": self.tar, "far": self.far, "threshold": self.threshold,
                "resolvable": self.resolvable, "rule": self.rule}


def allowed_false_accepts(far_target: float, negatives: int) -> int:
    """floor(far_target * negatives), robust to 1e-3 * 1000 = 0.999...9 in floating point."""
    return int(np.floor(far_target * negatives * (1 + 1e-9)))


def at_most_point(roc: ScoreRoc, far_target: float) -> int:
    """Index of the highest ROC point whose FAR does not exceed the target (never a point above it)."""
    allowed = allowed_false_accepts(far_target, int(roc.false_accepts[-1]))
    return int(np.flatnonzero(roc.false_accepts <= allowed)[-1])  # counts rise along the curve


def nearest_point(roc: ScoreRoc, far_target: float) -> int:
    """Index of the ROC point whose FAR is nearest the target, the highest one among equals.

    This is ``eval_ijbc.py``'s reading: it flips sklearn's ``roc_curve`` output and takes the first
    minimum of ``|fpr - target|``, i.e. the last one along the rising curve, so among points at the
    same distance the one with the larger FAR, and at the same FAR the larger TAR, wins. The point
    may lie above the target. The vertices here are the corners sklearn keeps by default
    (``drop_intermediate``); where impostor scores tie exactly on a flat stretch sklearn keeps a
    few more points there, which can move its pick by one step of the curve.
    """
    distance = np.abs(roc.fpr - far_target)
    return len(distance) - 1 - int(np.argmin(distance[::-1]))


_POINT_RULES = {"nearest": nearest_point, "at-most": at_most_point}


def tar_at_far(roc: ScoreRoc, far_target: float, rule: str) -> TarAtFar:
    """TAR at ``far_target`` by ``rule`` (``nearest`` or ``at-most``, see ``FAR_RULES``).

    A point where no genuine pair is accepted reads as accepting nothing: TAR 0 at FAR 0, no threshold.
    """
    if rule not in _POINT_RULES:
        raise HfsError(f"FAR rule {rule!r}: choose one of {', '.join(FAR_RULES)}")
    resolvable = allowed_false_accepts(far_target, int(roc.false_accepts[-1])) >= 1
    point = _POINT_RULES[rule](roc, far_target)
    if roc.true_accepts[point] == 0:
        return TarAtFar(far_target, 0.0, 0.0, None, resolvable, rule)
    return TarAtFar(far_target, float(roc.tpr[point]), float(roc.fpr[point]), float(roc.thresholds[point]),
                    resolvable, rule)


# --------------------------------------------------------------------------- results


@dataclass
class IjbResult:
    """Everything ``hfs eval-ijb`` reports; ``to_dict`` is what ``--json`` writes."""

    target: str
    faces: int
    templates: int
    pairs: int
    positives: int
    negatives: int
    tars_by_rule: dict[str, list[TarAtFar]]  # every rule of FAR_RULES
    auc: float
    eer: float
    far_rule: str = FAR_RULES[0]  # the rule the table shows and ``tar_at_far`` holds
    source: dict[str, Any] = field(default_factory=dict)
    roc: ScoreRoc | None = field(default=None, repr=False)

    @property
    def tars(self) -> list[TarAtFar]:
        """TAR at each target FAR by the chosen rule."""
        return self.tars_by_rule[self.far_rule]

    def to_dict(self) -> dict[str, Any]:
        by_rule = {rule: {far_label(t.far_target): t.to_dict() for t in tars}
                   for rule, tars in self.tars_by_rule.items()}
        return {"target": self.target, "faces": self.faces, "templates": self.templates, "pairs": self.pairs,
                "positives": self.positives, "negatives": self.negatives, "far_rule": self.far_rule,
                "tar_at_far": by_rule[self.far_rule], "tar_at_far_by_rule": by_rule,
                "auc": self.auc, "eer": self.eer, **self.source}


def far_label(far: float) -> str:
    """1e-06 -> '1e-6'."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def evaluate_pair_scores(pairs: PairScores, far_targets: Sequence[float] = FAR_TARGETS
                         ) -> tuple[dict[str, list[TarAtFar]], float, float, ScoreRoc]:
    """(TAR at each FAR by every rule of ``FAR_RULES``, AUC, EER, ROC) of scored pairs."""
    from hfs.eval.verification import equal_error_rate

    roc = score_roc(pairs.scores, pairs.labels)
    by_rule = {rule: [tar_at_far(roc, f, rule) for f in far_targets] for rule in FAR_RULES}
    return by_rule, roc_auc(roc), equal_error_rate(roc), roc


RULE_CAPTIONS = {
    "nearest": "FAR rule 'nearest': the ROC point whose FAR is nearest the target, as published IJB tables "
               "(eval_ijbc.py) read it; --far-rule at-most: the best TAR with FAR <= target",
    "at-most": "FAR rule 'at-most': the best TAR whose FAR does not exceed the target; "
               "--far-rule nearest reads the tables' way (the point nearest the target)",
}


def results_table(result: IjbResult):
    """One row: TAR (%) at each FAR, then AUC and EER; the caption names the FAR rule, '*' an unresolvable FAR."""
    from rich.table import Table

    table = Table(title=f"{result.target} 1:1 verification: TAR % at each FAR, rule {result.far_rule} "
                        f"({result.templates} templates, {result.pairs} pairs)")
    table.add_column("set")
    for t in result.tars:
        table.add_column(far_label(t.far_target), justify="right")
    table.add_column("AUC", justify="right")
    table.add_column("EER", justify="right")
    cells = [f"{100 * t.tar:.2f}{'' if t.resolvable else '*'}" for t in result.tars]
    table.add_row(result.target, *cells, f"{result.auc:.4f}", f"{result.eer:.4f}")
    caption = [RULE_CAPTIONS[result.far_rule]]
    if not all(t.resolvable for t in result.tars):
        caption.append(f"* fewer than 1/FAR impostor pairs ({result.negatives}): TAR at zero false accepts")
    table.caption = "\n".join(caption)
    return table


def write_result_json(path: str | Path, result: IjbResult) -> None:
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------- feature sources


def pool_feature_file(path: str | Path, pooling: TemplatePooling, accumulator: TemplateAccumulator,
                      chunk_rows: int = 8192, show_progress: bool = True) -> dict[str, Any]:
    """Pool the rows of a (faces x D) float ``.npy`` read chunk by chunk through a memory map."""
    from hfs.eval.extract import _progress_bar

    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise HfsError(f"--features {path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise HfsError(f"--features {path}: not a readable .npy feature file ({str(exc).splitlines()[0]})") from None
    faces = len(pooling.row_template)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise HfsError(f"--features {path}: expected a 2-D float array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] != faces:
        raise HfsError(f"--features {path}: {arr.shape[0]} rows, but the face file lists {faces} faces "
                       "(one row per line, in order)")
    bar = _progress_bar(show_progress)
    with bar:
        task = bar.add_task("pool", total=faces, info=path.name) if bar else None
        for start in range(0, faces, chunk_rows):
            block = np.asarray(arr[start:start + chunk_rows], dtype=np.float32)
            if not np.isfinite(block).all():
                bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise HfsError(f"--features {path}: row {bad} holds NaN or infinity")
            accumulator.add(start, block)
            if bar:
                bar.advance(task, len(block))
    return {"features": str(path), "dim": int(arr.shape[1])}


class AlignedFaces:
    """Dataset of aligned crops: ``(tensor, "")``, or ``(zeros, one-line error)`` for a bad face.

    Errors travel as data (as in :class:`hfs.eval.extract.EncodedImages`) so the DataLoader's
    workers shut down normally and the message stays one line.
    """

    def __init__(self, layout: IjbLayout, faces: FaceList, landmarks: LandmarkList, image_size: int) -> None:
        from hfs.eval.align import require_skimage

        require_skimage()  # fail before any worker starts
        self.image_dir = layout.image_dir
        self.landmark_file = layout.landmark_file
        self.names = faces.names
        self.points = landmarks.points
        self.lines = landmarks.lines
        self.image_size = image_size
        self.source = str(layout.landmark_file)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image, UnidentifiedImageError

        from hfs.data.transforms import to_tensor
        from hfs.eval.align import align_face

        path = self.image_dir / self.names[index]
        where = f"{self.landmark_file}:{self.lines[index]}"
        try:
            with Image.open(path) as img:
                crop = align_face(img, self.points[index], self.image_size)
            return to_tensor(crop), ""
        except FileNotFoundError:
            message = f"{path}: image missing (listed on {where})"
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            message = f"{path}: cannot be decoded ({type(exc).__name__})"
        except ValueError as exc:
            message = f"{where}: {exc}"
        return torch.zeros(3, self.image_size, self.image_size), message


def check_images_exist(layout: IjbLayout, faces: FaceList, landmarks: LandmarkList) -> None:
    """Every listed crop is there, checked with one directory listing before the long extraction."""
    if not layout.image_dir.is_dir():
        raise HfsError(f"{layout.image_dir}: image folder missing (the loose crops of {layout.target})")
    present = set(os.listdir(layout.image_dir))
    for row, name in enumerate(faces.names):
        if name not in present and not (layout.image_dir / name).is_file():
            raise HfsError(f"{layout.image_dir / name}: image missing "
                           f"(listed on {layout.landmark_file}:{landmarks.lines[row]})")


class FeatureFileWriter:
    """Rows written as they come into an ``.npy`` memory map, renamed into place only when complete."""

    def __init__(self, path: Path, rows: int, meta: dict[str, Any]) -> None:
        self.path, self.rows, self.meta = path, rows, meta
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.array: np.ndarray | None = None

    def write(self, start: int, block: np.ndarray) -> None:
        if self.array is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32,
                                                   shape=(self.rows, block.shape[1]))
        self.array[start:start + len(block)] = block

    def close(self, ok: bool) -> None:
        array, self.array = self.array, None
        if array is None:
            return
        dim = array.shape[1]
        if ok:
            array.flush()
        del array
        if not ok:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        from hfs.eval.extract import features_meta_path

        info = {**self.meta, "count": self.rows, "dim": dim, "dtype": "float32"}
        atomic_write_text(features_meta_path(self.path), json.dumps(info, indent=2, sort_keys=True) + "\n")


def pool_checkpoint(checkpoint: str | Path, layout: IjbLayout, faces: FaceList, landmarks: LandmarkList,
                    accumulator: TemplateAccumulator, *, flip: bool, batch_size: int, device: str,
                    num_workers: int, save_features: Path | None = None,
                    show_progress: bool = True) -> dict[str, Any]:
    """Align every face, embed it with the checkpoint's backbone, pool it; optionally keep the embeddings."""
    from hfs.eval.evaluate import load_embedding_model
    from hfs.eval.extract import iter_embeddings

    check_images_exist(layout, faces, landmarks)
    embedder = load_embedding_model(checkpoint, device)  # an hfs checkpoint or an exported .onnx
    model, device = embedder.model, embedder.device
    dataset = AlignedFaces(layout, faces, landmarks, embedder.image_size)
    source = {"checkpoint": str(embedder.source), **embedder.meta, "flip": flip}
    writer = (FeatureFileWriter(save_features, len(faces), {**source, "ijb": str(layout.root),
                                                            "target": layout.target})
              if save_features else None)
    start, ok = 0, False
    batches = iter_embeddings(model, dataset, batch_size=batch_size, flip=flip, device=device,
                              num_workers=num_workers, show_progress=show_progress,
                              description=f"{layout.target} faces")
    try:
        # closing(): an error raised here stops the generator's progress bar and loader at once
        with contextlib.closing(batches):
            for block in batches:
                if not np.isfinite(block).all():
                    raise HfsError(f"{checkpoint}: the model returned NaN or infinity for faces "
                                   f"{start}..{start + len(block) - 1}")
                if writer:
                    writer.write(start, block)
                accumulator.add(start, block)
                start += len(block)
        ok = True
    finally:
        if writer:
            writer.close(ok)
    if save_features:
        source["saved_features"] = str(save_features)
    return source


# --------------------------------------------------------------------------- the command


@dataclass
class IjbSettings:
    """The knobs of one ``hfs eval-ijb`` run."""

    root: Path
    target: str = "IJBC"
    checkpoint: Path | None = None
    features: Path | None = None
    flip: bool = False
    score_weight: bool = False
    keep_norm: bool = False
    batch_size: int = 256
    device: str = "auto"
    num_workers: int = 2
    pair_chunk: int = DEFAULT_PAIR_CHUNK
    save_features: Path | None = None
    far_targets: tuple[float, ...] = FAR_TARGETS
    far_rule: str = FAR_RULES[0]
    show_progress: bool = True


def check_settings(s: IjbSettings) -> None:
    """Argument mistakes, caught before any file is read."""
    if (s.checkpoint is None) == (s.features is None):
        raise HfsError("give either --checkpoint CKPT (faces are aligned and embedded) or --features FILE.npy")
    if s.save_features is not None and s.checkpoint is None:
        raise HfsError("--save-features goes with --checkpoint (it keeps the embeddings it computes)")
    if s.save_features is not None and Path(s.save_features).suffix != ".npy":
        raise HfsError(f"--save-features {s.save_features}: give a path ending in .npy")
    if s.pair_chunk < 1:
        raise HfsError(f"--pair-chunk must be positive, got {s.pair_chunk}")
    if s.far_rule not in FAR_RULES:
        raise HfsError(f"--far-rule {s.far_rule!r}: choose one of {', '.join(FAR_RULES)}")


def evaluate_ijb(s: IjbSettings) -> IjbResult:
    """Run the whole protocol and return the result (the caller prints, writes JSON, plots)."""
    check_settings(s)
    if s.checkpoint is not None:
        from hfs.eval.align import require_skimage

        require_skimage()  # a missing extra is reported before any file is read
    layout = IjbLayout.resolve(s.root, s.target)
    faces = read_face_file(layout.face_file)
    pooling = TemplatePooling.from_faces(faces)
    check_pair_file(layout.pair_file, pooling.templates, s.pair_chunk, s.show_progress)  # fail before the long part
    landmarks = (read_landmark_file(layout.landmark_file, faces)
                 if s.checkpoint is not None or s.score_weight else None)
    weighting = ImageWeighting(keep_norm=s.keep_norm, scores=landmarks.scores if s.score_weight else None)
    accumulator = TemplateAccumulator(pooling, weighting)
    if s.checkpoint is not None:
        source = pool_checkpoint(s.checkpoint, layout, faces, landmarks, accumulator, flip=s.flip,
                                 batch_size=s.batch_size, device=s.device, num_workers=s.num_workers,
                                 save_features=s.save_features, show_progress=s.show_progress)
    else:
        source = pool_feature_file(s.features, pooling, accumulator, show_progress=s.show_progress)
    templates = accumulator.features()
    log.info("%s: %d faces pooled into %d templates", layout.target, len(faces), len(pooling.templates))
    pairs = score_pairs(layout.pair_file, pooling.templates, templates, s.pair_chunk, s.show_progress)
    tars_by_rule, auc, eer, roc = evaluate_pair_scores(pairs, s.far_targets)
    source = {"root": str(layout.root), **source, "score_weight": s.score_weight, "keep_norm": s.keep_norm}
    return IjbResult(target=layout.target, faces=len(faces), templates=len(pooling.templates),
                     pairs=len(pairs.scores), positives=int(pairs.labels.sum()),
                     negatives=int((~pairs.labels).sum()), tars_by_rule=tars_by_rule, auc=auc, eer=eer,
                     far_rule=s.far_rule, source=source, roc=roc)
