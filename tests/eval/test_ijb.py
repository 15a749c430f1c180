"""`hfs eval-ijb` on a generated IJB release; every number is recomputed here the slow, obvious way."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from hfs.cli import app
from tests.eval.helpers import save_untrained_checkpoint
from hfs.eval.ijb import (FAR_RULES, FAR_TARGETS, IjbSettings, evaluate_ijb, far_label, roc_auc, score_roc,
                          tar_at_far)
from hfs.utils.errors import HfsError
from tests.eval.ijb_data import make_ijb


def _hfs(*args):
    return subprocess.run([sys.executable, "-m", "hfs", *map(str, args)], capture_output=True, text=True)


# --------------------------------------------------------------------------- the reference, written plainly


def brute_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Max TAR over every threshold (each score, and above all) whose FAR <= far; accept score >= t."""
    pos, neg = scores[labels], scores[~labels]
    best = 0.0
    for t in np.r_[np.unique(scores), np.inf]:
        if (neg >= t).sum() <= far * len(neg):
            best = max(best, float((pos >= t).mean()))
    return best


def eval_ijbc_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """arcface_torch's eval_ijbc.py: sklearn's roc_curve (defaults), flipped, first min of |fpr - far|."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(np.int64)
    last_of_each_score = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_each_score]
    fps = 1 + last_of_each_score - tps
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]  # drop_intermediate=True
    fps, tps = np.r_[0, fps[keep]], np.r_[0, tps[keep]]
    fpr, tpr = np.flipud(fps / fps[-1]), np.flipud(tps / tps[-1])
    _, index = min(zip(np.abs(fpr - far), range(len(fpr))))
    return float(tpr[index])


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def reference_template_features(feats, templates, medias, scores=None, keep_norm=False) -> dict[int, np.ndarray]:
    """The protocol as its definition reads: per template, per media the mean, then the sum, normalised."""
    f = np.asarray(feats, dtype=np.float64)
    if not keep_norm:
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    if scores is not None:
        f = f * scores[:, None]
    out = {}
    for t in np.unique(templates):
        in_t = templates == t
        total = sum(f[in_t & (medias == m)].mean(axis=0) for m in np.unique(medias[in_t]))
        out[int(t)] = total / np.linalg.norm(total)
    return out


def reference_scores(toy, feats, **kw) -> tuple[np.ndarray, np.ndarray]:
    tf = reference_template_features(feats, toy.templates, toy.medias, **kw)
    scores = np.array([tf[a] @ tf[b] for a, b, _ in toy.pairs], dtype=np.float32)
    return scores, toy.pairs[:, 2] == 1


def subject_features(toy, dim: int = 16, noise: float = 1.2, seed: int = 1) -> np.ndarray:
    """Rows near their subject's direction, noisy enough that the classes overlap; varied norms."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((toy.subjects.max() + 1, dim))
    feats = centres[toy.subjects] + noise * rng.standard_normal((len(toy.subjects), dim))
    return (feats * rng.uniform(0.5, 3.0, (len(feats), 1))).astype(np.float32)


@pytest.fixture
def toy(tmp_path):
    return make_ijb(tmp_path / "IJBC", "IJBC", subjects=20, templates_per_subject=4)


@pytest.fixture
def toy_features(tmp_path, toy):
    path = tmp_path / "feats.npy"
    np.save(path, subject_features(toy))
    return path


# --------------------------------------------------------------------------- ROC and TAR@FAR


@pytest.mark.parametrize("decimals", [None, 1, 2])  # None: no ties; 1: heavy ties across labels
def test_tar_auc_eer_match_brute_force(decimals):
    rng = np.random.default_rng(decimals or 0)
    labels = rng.random(3000) < 0.1
    scores = (rng.standard_normal(3000) + 1.5 * labels).astype(np.float32)
    if decimals is not None:
        scores = np.round(scores, decimals).astype(np.float32)
    roc = score_roc(scores, labels)
    for far in (0.0005, 0.001, 0.01, 0.05, 0.1, 0.5):
        got = tar_at_far(roc, far, "at-most")
        assert got.tar == pytest.approx(brute_tar(scores, labels, far)), far
        if got.threshold is not None:  # the reported threshold really gives that TAR within the FAR
            assert (scores[labels] >= got.threshold).mean() == pytest.approx(got.tar)
            assert (scores[~labels] >= got.threshold).mean() == pytest.approx(got.far)
            assert got.far <= far
    assert roc_auc(roc) == pytest.approx(brute_auc(scores, labels))
    # the EER: where the false reject rate crosses the false accept rate along the ROC
    fnr = 1 - roc.tpr
    i = int(np.argmax(fnr - roc.fpr <= 0))
    assert roc.fpr[i - 1] <= fnr[i - 1] and roc.fpr[i] >= fnr[i]


def test_tar_at_far_below_one_impostor_is_flagged():
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.1, 0.2], dtype=np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    roc = score_roc(scores, labels)
    for rule in FAR_RULES:
        low, high = tar_at_far(roc, 1e-3, rule), tar_at_far(roc, 0.34, rule)
        assert not low.resolvable and low.tar == 0.0 and low.threshold is None  # the top impostor outscores all
        assert high.resolvable and high.tar == 1.0 and high.far == pytest.approx(1 / 3)


# 4 genuine and 10 impostor scores; the ROC's corners (FAR, TAR), accepting score >= threshold:
# (0, 0) (0, .25)@0.9 (.1, .25) (.1, .5)@0.8 (.2, .5) (.2, .75)@0.6 (.4, .75) (.4, 1)@0.3 (1, 1)
HAND_GENUINE = [0.9, 0.8, 0.6, 0.3]
HAND_IMPOSTOR = [0.85, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]


@pytest.mark.parametrize("far, rule, tar, reached, threshold", [
    (0.17, "at-most", 0.50, 0.1, 0.8),   # FAR 0.2 would exceed 0.17: stay at 0.1
    (0.17, "nearest", 0.75, 0.2, 0.6),   # 0.2 is 0.03 away, 0.1 is 0.07: take the point above the target
    (0.35, "at-most", 0.75, 0.2, 0.6),   # no corner between 0.2 and 0.4
    (0.35, "nearest", 1.00, 0.4, 0.3),   # 0.4 is nearer; of its two points the higher TAR
    (0.12, "nearest", 0.50, 0.1, 0.8),   # below the target now, and at FAR 0.1 the higher of (.1, .25), (.1, .5)
    (0.05, "at-most", 0.25, 0.0, 0.9),
    (0.05, "nearest", 0.50, 0.1, 0.8),   # 0 and 0.1 are equally near: the higher one, as eval_ijbc.py picks
])
def test_the_two_far_rules_on_a_roc_read_by_hand(far, rule, tar, reached, threshold):
    scores = np.array(HAND_GENUINE + HAND_IMPOSTOR, dtype=np.float32)
    labels = np.arange(len(scores)) < len(HAND_GENUINE)
    got = tar_at_far(score_roc(scores, labels), far, rule)
    assert (got.rule, got.tar, got.far) == (rule, pytest.approx(tar), pytest.approx(reached))
    assert got.threshold == pytest.approx(threshold)
    assert (scores[labels] >= got.threshold).mean() == pytest.approx(got.tar)  # the threshold gives them
    assert (scores[~labels] >= got.threshold).mean() == pytest.approx(got.far)
    assert got.tar == pytest.approx(eval_ijbc_tar(scores, labels, far) if rule == "nearest"
                                    else brute_tar(scores, labels, far))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_rule_matches_eval_ijbc_on_scores_without_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(20000) < 0.05
    scores = (rng.standard_normal(20000) + 2.0 * labels).astype(np.float32)
    _, first = np.unique(scores, return_index=True)  # drop ties: they are where sklearn keeps extra points
    scores, labels = scores[np.sort(first)], labels[np.sort(first)]
    roc = score_roc(scores, labels)
    differ = 0
    for far in (1e-4, 3e-4, 1e-3, 0.01, 0.05, 0.1, 0.37):
        nearest, at_most = tar_at_far(roc, far, "nearest"), tar_at_far(roc, far, "at-most")
        assert nearest.tar == pytest.approx(eval_ijbc_tar(scores, labels, far)), far
        assert at_most.tar <= nearest.tar or nearest.far < at_most.far  # nearest never reads lower at a higher FAR
        differ += nearest.tar != at_most.tar
    assert differ  # the rules are told apart at some target here


def test_the_config_key_offers_exactly_the_rules():
    from hfs.config import HfsConfig, key_rules

    assert key_rules("eval.ijb_far_rule")["choices"] == FAR_RULES
    assert HfsConfig().eval.ijb_far_rule == FAR_RULES[0] == IjbSettings(root=".").far_rule == "nearest"


def test_an_unknown_far_rule_is_refused():
    roc = score_roc(np.array([0.9, 0.1], np.float32), np.array([True, False]))
    with pytest.raises(HfsError, match="choose one of nearest, at-most"):
        tar_at_far(roc, 0.1, "closest")


def test_tar_needs_both_labels():
    with pytest.raises(HfsError, match="both genuine"):
        score_roc(np.ones(4, np.float32), np.ones(4, bool))


# --------------------------------------------------------------------------- the protocol, from an .npy


@pytest.mark.parametrize("keep_norm, score_weight", [(False, False), (True, True), (False, True)])
def test_npy_features_match_the_protocol_computed_by_hand(toy, toy_features, keep_norm, score_weight):
    result = evaluate_ijb(IjbSettings(root=toy.root, target="IJBC", features=toy_features, keep_norm=keep_norm,
                                      score_weight=score_weight, pair_chunk=97, show_progress=False))
    scores, labels = reference_scores(toy, np.load(toy_features), keep_norm=keep_norm,
                                      scores=toy.scores if score_weight else None)
    assert (result.pairs, result.positives, result.templates, result.faces) == (
        len(toy.pairs), int(labels.sum()), 80, len(toy.names))
    assert result.far_rule == "nearest" and result.tars is result.tars_by_rule["nearest"]
    for t in result.tars_by_rule["at-most"]:
        assert t.tar == pytest.approx(brute_tar(scores, labels, t.far_target), abs=1e-12), t.far_target
    for t in result.tars_by_rule["nearest"]:
        assert t.tar == pytest.approx(eval_ijbc_tar(scores, labels, t.far_target), abs=1e-12), t.far_target
    assert 0.2 < result.tars[-1].tar < 1.0  # the classes overlap: the test can tell rules apart
    assert result.auc == pytest.approx(brute_auc(scores, labels), abs=1e-6)


def test_pair_chunking_does_not_change_scores(toy, toy_features):
    from hfs.eval.ijb import (IjbLayout, ImageWeighting, TemplateAccumulator, TemplatePooling,
                              pool_feature_file, read_face_file, score_pairs)

    layout = IjbLayout.resolve(toy.root, "IJBC")
    pooling = TemplatePooling.from_faces(read_face_file(layout.face_file))
    acc = TemplateAccumulator(pooling, ImageWeighting())
    pool_feature_file(toy_features, pooling, acc, chunk_rows=5, show_progress=False)
    feats = acc.features()
    whole = score_pairs(layout.pair_file, pooling.templates, feats, 10**6, show_progress=False)
    chunked = score_pairs(layout.pair_file, pooling.templates, feats, 13, show_progress=False)
    np.testing.assert_array_equal(whole.scores, chunked.scores)
    np.testing.assert_array_equal(whole.labels, toy.pairs[:, 2] == 1)
    expected, _ = reference_scores(toy, np.load(toy_features))
    np.testing.assert_allclose(whole.scores, expected, atol=1e-6)


def test_blank_lines_and_crlf_endings_are_read_alike(toy, toy_features):
    settings = IjbSettings(root=toy.root, target="IJBC", features=toy_features, pair_chunk=50, show_progress=False)
    before = evaluate_ijb(settings).to_dict()
    for kind in ("template_pair_label", "face_tid_mid"):
        path = toy.meta(kind)
        lines = path.read_text().splitlines()
        path.write_bytes(("\r\n".join(lines[:10] + ["", "  "] + lines[10:]) + "\r\n").encode())
    assert evaluate_ijb(settings).to_dict() == before


def test_separable_scores_give_full_tar(tmp_path):
    toy = make_ijb(tmp_path / "IJBB", "IJBB", subjects=15, templates_per_subject=3)
    feats = np.eye(16, dtype=np.float32)[toy.subjects] * 2.0  # one direction per subject
    np.save(tmp_path / "f.npy", feats)
    result = evaluate_ijb(IjbSettings(root=toy.root, target="IJBB", features=tmp_path / "f.npy", show_progress=False))
    negatives = len(toy.pairs) - 15 * 3
    assert result.negatives == negatives
    for t in result.tars:
        assert t.tar == 1.0 and t.resolvable == (t.far_target * negatives >= 1)
    assert result.auc == 1.0 and result.eer == 0.0


# --------------------------------------------------------------------------- the command


def test_cli_json_in_a_subprocess(tmp_path, toy, toy_features):
    out = tmp_path / "ijb.json"
    proc = _hfs("eval-ijb", "--root", toy.root, "--target", "ijbc", "--features", toy_features,
                "--score-weight", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert "1e-4" in proc.stdout and f"{100 * data['tar_at_far']['1e-1']['tar']:.2f}" in proc.stdout
    assert "rule nearest" in proc.stdout  # the table says which rule it shows
    scores, labels = reference_scores(toy, np.load(toy_features), scores=toy.scores)
    assert data["target"] == "IJBC" and data["features"] == str(toy_features) and data["score_weight"] is True
    assert data["far_rule"] == "nearest" and data["tar_at_far"] == data["tar_at_far_by_rule"]["nearest"]
    assert list(data["tar_at_far"]) == [far_label(f) for f in FAR_TARGETS] == ["1e-6", "1e-5", "1e-4", "1e-3",
                                                                                  "1e-2", "1e-1"]
    assert list(data["tar_at_far_by_rule"]) == list(FAR_RULES)
    for far in FAR_TARGETS:
        at_most = data["tar_at_far_by_rule"]["at-most"][far_label(far)]
        nearest = data["tar_at_far_by_rule"]["nearest"][far_label(far)]
        assert at_most["tar"] == pytest.approx(brute_tar(scores, labels, far), abs=1e-12)
        assert nearest["tar"] == pytest.approx(eval_ijbc_tar(scores, labels, far), abs=1e-12)
        assert (at_most["rule"], nearest["rule"]) == ("at-most", "nearest")
        assert at_most["resolvable"] == nearest["resolvable"] == (far * (~labels).sum() >= 1)
    assert not list(tmp_path.glob(".ijb.json*"))  # no temp file left beside it


@pytest.mark.parametrize("how", [["--far-rule", "at-most"], ["--set", "eval.ijb_far_rule=at-most"]])
def test_the_far_rule_is_chosen_by_flag_or_config(tmp_path, toy, toy_features, how):
    out = tmp_path / "ijb.json"
    result = CliRunner().invoke(app, ["eval-ijb", "--root", str(toy.root), "--features", str(toy_features),
                                      "--json", str(out), *how])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["far_rule"] == "at-most" and data["tar_at_far"] == data["tar_at_far_by_rule"]["at-most"]
    assert "rule at-most" in result.output


def test_a_bad_far_rule_is_one_error_line(toy, toy_features):
    line = _one_error_line(_hfs("eval-ijb", "--root", toy.root, "--features", toy_features, "--far-rule", "closest"))
    assert "--far-rule" in line and "nearest, at-most" in line


def test_plot_draws_a_png(tmp_path, toy, toy_features):
    pytest.importorskip("matplotlib")
    png = tmp_path / "roc.png"
    result = CliRunner().invoke(app, ["eval-ijb", "--root", str(toy.root), "--features", str(toy_features),
                                      "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- bad input: one line, non-zero exit


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_missing_meta_file(toy, toy_features):
    toy.meta("template_pair_label").unlink()
    line = _one_error_line(_hfs("eval-ijb", "--root", toy.root, "--features", toy_features))
    assert str(toy.meta("template_pair_label")) in line and "missing" in line


@pytest.mark.parametrize("kind, line_no, text, fragment", [
    ("template_pair_label", 5, "7 12\n", "expected 'template_1 template_2 label', got 2 fields"),
    ("template_pair_label", 9, "7 x 1\n", "must be integers"),
    ("template_pair_label", 3, "7 12 2\n", "label must be 0 or 1, got 2"),
    ("template_pair_label", 4, "7 99999 0\n", "template 99999 has no faces"),
    ("face_tid_mid", 6, "6.jpg 7\n", "expected 'image template_id media_id', got 2 fields"),
    ("name_5pts_score", 2, "1.jpg 1 2 3 4 5 6 7 8 9 0.9\n", "expected an image name, 10 landmark coordinates"),
    ("name_5pts_score", 3, "nope.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n", "image nope.jpg where the face file's row 3"),
    ("name_5pts_score", 4, "3.jpg 1 2 3 4 5 6 7 8 9 nan 0.9\n", "landmarks and score must be finite numbers"),
])
def test_malformed_line_names_file_and_line(toy, toy_features, kind, line_no, text, fragment):
    path = toy.meta(kind)
    lines = path.read_text().splitlines(True)
    lines[line_no - 1] = text
    path.write_text("".join(lines))
    line = _one_error_line(_hfs("eval-ijb", "--root", toy.root, "--features", toy_features, "--score-weight"))
    assert f"{path}:{line_no}: " in line and fragment in line


def test_feature_rows_must_match_the_face_file(tmp_path, toy):
    np.save(tmp_path / "short.npy", np.ones((3, 8), np.float32))
    line = _one_error_line(_hfs("eval-ijb", "--root", toy.root, "--features", tmp_path / "short.npy"))
    assert "3 rows" in line and f"{len(toy.names)} faces" in line


@pytest.mark.parametrize("args, fragment", [
    (["--target", "IJBA"], "--target 'IJBA'"),
    (["--root", "/nonexistent/IJBC"], "--root /nonexistent/IJBC"),
    ([], "give either --checkpoint"),
])
def test_bad_arguments(toy, toy_features, args, fragment):
    base = ["--root", toy.root] if "--root" not in args else []
    source = ["--features", toy_features] if args else []
    line = _one_error_line(_hfs("eval-ijb", *base, *source, *args))
    assert fragment in line


# --------------------------------------------------------------------------- alignment and a real checkpoint


def test_alignment_recovers_the_aligned_face(tmp_path):
    pytest.importorskip("skimage")
    from PIL import Image
    from skimage.transform import SimilarityTransform, warp

    from hfs.eval.align import REFERENCE_LANDMARKS_112, align_face
    from tests.eval.ijb_data import aligned_face

    toy = make_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=1, images=True)
    for row in range(3):
        with Image.open(toy.root / "loose_crop" / toy.names[row]) as img:
            loose = np.asarray(img.convert("RGB"))
            crop = np.asarray(align_face(img, toy.landmarks[row])).astype(float)
        original = aligned_face(toy, row).astype(float)
        inner = (slice(12, 100), slice(12, 100))
        assert np.abs(crop[inner] - original[inner]).mean() < 8  # JPEG and two resamplings apart
        # the same crop as scikit-image's own warp (pixel centres at integers) of the fitted transform
        fitted = SimilarityTransform.from_estimate(toy.landmarks[row], REFERENCE_LANDMARKS_112)
        expected = warp(loose, fitted.inverse, output_shape=(112, 112), order=1, preserve_range=True)
        # PIL truncates to uint8; half a pixel off (the other pixel-centre convention) gives > 0.3
        assert np.abs(crop[inner] - np.floor(expected[inner] + 1e-6)).mean() < 0.05
        # and the fit undoes the placement (the landmarks were written with two decimals)
        np.testing.assert_allclose(fitted.params @ toy.placements[row], np.eye(3), atol=0.02)


@pytest.fixture
def checkpoint(tmp_path):
    return save_untrained_checkpoint(tmp_path / "run", 32, 3)


def test_checkpoint_aligns_embeds_and_pools(tmp_path, checkpoint):
    pytest.importorskip("skimage")
    import torch
    from PIL import Image
    from skimage.transform import AffineTransform, warp

    from hfs.data.transforms import to_tensor
    from hfs.models.loading import load_backbone

    toy = make_ijb(tmp_path / "IJBB", "IJBB", subjects=4, templates_per_subject=2, images=True)
    saved, a_json, b_json = tmp_path / "faces.npy", tmp_path / "a.json", tmp_path / "b.json"
    result = CliRunner().invoke(app, ["eval-ijb", "--root", str(toy.root), "--target", "IJBB", "--checkpoint",
                                      str(checkpoint), "--flip", "--batch-size", "5", "--num-workers", "0",
                                      "--device", "cpu", "--save-features", str(saved), "--json", str(a_json)])
    assert result.exit_code == 0, (result.output, result.exception)
    feats = np.load(saved)
    assert feats.shape == (len(toy.names), 16)
    assert json.loads(saved.with_suffix(".json").read_text())["flip"] is True

    # the same embeddings from crops made here with scikit-image's warp of the known placement
    model, _ = load_backbone(checkpoint)
    for row in (0, len(toy.names) - 1):
        with Image.open(toy.root / "loose_crop" / toy.names[row]) as img:
            loose = np.asarray(img.convert("RGB"))
        crop = warp(loose, AffineTransform(matrix=toy.placements[row]), output_shape=(112, 112), order=1,
                    preserve_range=True)
        small = Image.fromarray(np.clip(crop + 0.5, 0, 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        x = to_tensor(small)[None]
        with torch.no_grad():
            expected = (model(x) + model(torch.flip(x, dims=[3]))).numpy()[0]
        cosine = expected @ feats[row] / np.linalg.norm(expected) / np.linalg.norm(feats[row])
        assert cosine > 0.995, row

    # scoring the saved embeddings gives the same numbers as the checkpoint run
    result = CliRunner().invoke(app, ["eval-ijb", "--root", str(toy.root), "--target", "IJBB", "--features",
                                      str(saved), "--json", str(b_json)])
    assert result.exit_code == 0, result.output
    a, b = json.loads(a_json.read_text()), json.loads(b_json.read_text())
    assert a["checkpoint"] == str(checkpoint) and b["features"] == str(saved)
    for key in ("1e-3", "1e-2", "1e-1"):
        assert a["tar_at_far"][key]["tar"] == pytest.approx(b["tar_at_far"][key]["tar"])
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-6)
    scores, labels = reference_scores(toy, feats)
    assert a["tar_at_far_by_rule"]["at-most"]["1e-1"]["tar"] == pytest.approx(brute_tar(scores, labels, 0.1))
    assert a["tar_at_far"]["1e-1"]["tar"] == pytest.approx(eval_ijbc_tar(scores, labels, 0.1))


def test_missing_image_names_the_file(tmp_path, checkpoint):
    pytest.importorskip("skimage")
    toy = make_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2, images=True)
    missing = toy.root / "loose_crop" / toy.names[2]
    missing.unlink()
    line = _one_error_line(_hfs("eval-ijb", "--root", toy.root, "--checkpoint", checkpoint, "--num-workers", "0",
                                "--save-features", tmp_path / "f.npy"))
    assert f"{missing}: image missing" in line and f"{toy.meta('name_5pts_score')}:3" in line
    assert not list(tmp_path.glob("*.npy"))


@pytest.mark.slow
def test_undecodable_image_stops_the_extraction_with_its_name(tmp_path, checkpoint):
    pytest.importorskip("skimage")
    toy = make_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2, images=True)
    broken = toy.root / "loose_crop" / toy.names[-1]
    broken.write_bytes(b"not a jpeg")
    proc = _hfs("eval-ijb", "--root", toy.root, "--checkpoint", checkpoint, "--num-workers", "0", "--batch-size", "4",
                "--save-features", tmp_path / "f.npy", "--json", tmp_path / "r.json")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and f"{broken}: cannot be decoded" in errors[0]
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".f.npy*"))  # nothing half-written
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_a_model_that_returns_nan_stops_cleanly(tmp_path, checkpoint):
    pytest.importorskip("skimage")
    import torch

    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["backbone"]["fc.weight"].fill_(float("nan"))
    torch.save(ckpt, checkpoint)
    toy = make_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2, images=True)
    proc = _hfs("eval-ijb", "--root", toy.root, "--checkpoint", checkpoint, "--num-workers", "0",
                "--save-features", tmp_path / "f.npy")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {checkpoint}: the model returned NaN or infinity "
                                                    f"for faces 0..{len(toy.names) - 1}")
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".f.npy*"))


def test_alignment_without_scikit_image_says_how_to_install(tmp_path, checkpoint, monkeypatch):
    toy = make_ijb(tmp_path / "IJBC", subjects=2, templates_per_subject=2)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(HfsError, match=r"pip install scikit-image \(or, in the hfs checkout, pip install -e '\.\[ijb\]'\)"):
        evaluate_ijb(IjbSettings(root=toy.root, checkpoint=checkpoint, num_workers=0, show_progress=False))
