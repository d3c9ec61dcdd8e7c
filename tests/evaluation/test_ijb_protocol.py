"""IJB protocol files read as insightface's ijb_11.py reads them; missing data refused or counted; evaluate_ijb
against a per-template reference of the insightface loop on a synthetic IJB-C set; facekd eval --ijb."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve

from facekd.config import job_from_dict
from facekd.data.loader import to_float
from facekd.data.synth_ijb import synthesize_ijb
from facekd.errors import DataError
from facekd.evaluation import ijb_1n, ijb_protocol
from facekd.evaluation.ijb import align_face
from facekd.network import load_network


@pytest.fixture(scope="module")
def ijb_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    summary = synthesize_ijb(root, num_subjects=8, templates_per_subject=4, image_size=32, seed=2)
    return root, summary


@pytest.fixture
def ijb_root(ijb_source, tmp_path):
    """A private copy of the synthetic set, free to damage."""
    root = tmp_path / "IJBC"
    shutil.copytree(ijb_source[0], root)
    return root


@pytest.fixture
def run(tiny_job):
    from facekd.train import Trainer

    job = job_from_dict(tiny_job("teacher", train={"steps": 4}))
    Trainer(job).fit()
    return job.train.output_dir


def _lines(root, suffix):
    return (root / "meta" / f"ijbc_{suffix}.txt").read_text().splitlines()


def test_read_ijb_parses_the_layout(ijb_source) -> None:
    root, summary = ijb_source
    protocol = ijb_protocol.read_ijb(root, "IJBC")
    assert len(protocol.images) == summary["num_images"] and protocol.landmarks.shape == (summary["num_images"], 5, 2)
    assert len(protocol.first) == summary["num_pairs"] and protocol.labels.sum() == summary["num_same_pairs"]
    first_row = _lines(root, "name_5pts_score")[0].split()
    np.testing.assert_array_equal(protocol.landmarks[0].ravel(), np.array(first_row[1:11], float))
    assert protocol.faceness[0] == float(first_row[11])
    image, template, media = _lines(root, "face_tid_mid")[-1].split()
    assert (protocol.images[-1], protocol.templates[-1], protocol.medias[-1]) == (image, int(template), int(media))
    assert protocol.skipped == {"images": 0, "templates": 0, "pairs": 0, "1n_templates": 0}
    # 1:N: subjects 1..4 enrolled in G1 by their first templates (1, 5, 9, 13), subjects 5..8 in G2; the rest probe
    assert protocol.one_n["G1"] == {1: 1, 5: 2, 9: 3, 13: 4} and protocol.one_n["G2"] == {17: 5, 21: 6, 25: 7, 29: 8}
    assert protocol.one_n["probes"] == {t: (t - 1) // 4 + 1 for t in range(1, 33) if (t - 1) % 4}


def test_missing_landmarks_and_images_are_refused_or_counted(ijb_root) -> None:
    rows = _lines(ijb_root, "face_tid_mid")
    by_template: dict[int, list[str]] = {}
    for image, template, _ in (row.split() for row in rows):
        by_template.setdefault(int(template), []).append(image)
    # template 2 loses the landmarks of one image; template 4 loses every image file
    landmark_path = ijb_root / "meta" / "ijbc_name_5pts_score.txt"
    original = landmark_path.read_text()
    landmark_path.write_text("\n".join(line for line in _lines(ijb_root, "name_5pts_score")
                                       if line.split()[0] != by_template[2][0]) + "\n")
    with pytest.raises(DataError, match=f"template 2: image {by_template[2][0]} has no landmarks"):
        ijb_protocol.read_ijb(ijb_root, "IJBC")
    for image in by_template[4]:
        (ijb_root / "loose_crop" / image).unlink()
    protocol = ijb_protocol.read_ijb(ijb_root, "IJBC", skip_missing=True)
    pairs = [list(map(int, line.split())) for line in _lines(ijb_root, "template_pair_label")]
    lost_pairs = sum(4 in pair[:2] for pair in pairs)
    assert protocol.skipped == {"images": 1 + len(by_template[4]), "templates": 1, "pairs": lost_pairs,
                                "1n_templates": 1}  # template 4 was one of subject 1's probes
    assert 4 not in protocol.one_n["probes"]
    assert by_template[2][0] not in protocol.images and 4 not in protocol.templates
    assert len(protocol.first) == len(pairs) - lost_pairs and 4 not in protocol.first and 4 not in protocol.second
    landmark_path.write_text(original)
    with pytest.raises(DataError, match="template 4: image .* has no image file"):
        ijb_protocol.read_ijb(ijb_root, "IJBC")


def test_malformed_files_name_the_line(ijb_root) -> None:
    path = ijb_root / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "1 2\n")
    with pytest.raises(DataError, match=r"ijbc_template_pair_label.txt:\d+: expected 3 space-separated fields"):
        ijb_protocol.read_ijb(ijb_root, "IJBC")
    path.write_text("1 99 0\n")
    with pytest.raises(DataError, match="names template 99, which ijbc_face_tid_mid.txt does not list"):
        ijb_protocol.read_ijb(ijb_root, "IJBC")
    with pytest.raises(DataError, match="ijbb_face_tid_mid.txt is missing"):
        ijb_protocol.read_ijb(ijb_root, "IJBB")


def reference_scores(backbone, root, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """insightface ijb_11.py, step by step: per image align + embed + flip (F2), times faceness (D1, no norm: N1);
    per template a loop over its media (mean of a media's frames), summed, normalised; pair dot products."""
    tid_mid = [line.split() for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    detections = {fields[0]: fields[1:] for fields in
                  (line.split() for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines())}
    features = []
    with torch.no_grad():
        for image_name, _, _ in tid_mid:
            values = np.array(detections[image_name], np.float64)
            aligned = align_face(Image.open(root / "loose_crop" / image_name), values[:10].reshape(5, 2), image_size)
            x = to_float(torch.from_numpy(aligned[None].copy()), "mxnet")
            embedding = (backbone(x) + backbone(torch.flip(x, dims=[3]))).double().numpy()[0]
            features.append(embedding * values[10])
    features = np.array(features)
    templates = np.array([int(row[1]) for row in tid_mid])
    medias = np.array([int(row[2]) for row in tid_mid])
    template_feature = {}
    for template in np.unique(templates):
        in_template = templates == template
        total = sum(features[in_template & (medias == media)].mean(axis=0) for media in np.unique(medias[in_template]))
        template_feature[template] = total / np.linalg.norm(total)
    pairs = np.array([list(map(int, line.split())) for line in
                      (root / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()])
    scores = np.array([template_feature[a] @ template_feature[b] for a, b, _ in pairs])
    return scores, pairs[:, 2].astype(bool), template_feature


def test_evaluate_ijb_equals_the_insightface_loop_and_caches(run, ijb_source, tmp_path) -> None:
    root, _ = ijb_source
    rows = ijb_protocol.evaluate_ijb([run], root, name="IJBC", out_dir=tmp_path / "out", device="cpu",
                                     batch_size=7, names=["teacher"], progress=False)
    network = load_network(run, "cpu", with_head=False)
    scores, labels, template_feature = reference_scores(network.backbone, root, 32)
    (row,) = rows
    np.testing.assert_allclose(row["scores"], scores, atol=2e-6)
    assert not row["cached"] and row["num_pairs"] == len(scores) and row["num_same_pairs"] == labels.sum()
    # TAR at FAR 1e-1 from sklearn's ROC of the reference scores: the best TPR with FPR <= 0.1
    fpr, tpr, _ = roc_curve(labels, scores)
    assert row["tar_at_far"][0.1] == pytest.approx(tpr[fpr <= 0.1].max(), abs=1e-12)
    assert np.isnan(row["tar_at_far"][1e-3])  # 448 impostor pairs cannot measure 1e-3
    # 1:N closed set: each probe template against the eight enrolled ones, by argsort
    one_n = ijb_protocol.read_ijb(root, "IJBC").one_n
    enrolled = {**one_n["G1"], **one_n["G2"]}
    ranks = []
    for template, subject in one_n["probes"].items():
        order = sorted(enrolled, key=lambda g: -(template_feature[template] @ template_feature[g]))
        ranks.append([enrolled[g] for g in order].index(subject) + 1)
    figures = row["identification"]
    assert figures["rank1"] == pytest.approx(np.mean(np.array(ranks) <= 1), abs=1e-12)
    assert figures["rank5"] == pytest.approx(np.mean(np.array(ranks) <= 5), abs=1e-12)
    assert figures["num_probes"] == 24 and not np.isnan(figures["tpir_at_fpir"]["G1"][0.1])  # 12 non-mated
    for gallery in ("G1", "G2"):
        probe_templates = list(one_n["probes"])
        expected = ijb_1n.tpir_at_fpir(np.array([template_feature[t] for t in probe_templates]),
                                       np.array([one_n["probes"][t] for t in probe_templates]),
                                       np.array([template_feature[t] for t in one_n[gallery]]),
                                       np.array(list(one_n[gallery].values())))
        assert figures["tpir_at_fpir"][gallery] == pytest.approx(expected, nan_ok=True, abs=1e-6)
    again = ijb_protocol.evaluate_ijb([run], root, name="IJBC", out_dir=tmp_path / "out", device="cpu",
                                      names=["teacher"], progress=False)
    assert again[0]["cached"]
    np.testing.assert_array_equal(again[0]["scores"], row["scores"])
    saved = json.loads((tmp_path / "out" / "IJBC.json").read_text())
    assert saved[0]["tar_at_far"]["0.1"] == row["tar_at_far"][0.1] and saved[0]["model"] == "teacher"
    assert (tmp_path / "out" / "roc_IJBC.png").stat().st_size > 1000
    table = (tmp_path / "out" / "IJBC.md").read_text()
    assert "| IJBC TAR@FAR | 1e-06 |" in table and f"{100 * row['tar_at_far'][0.1]:.2f}" in table
    assert "| IJBC 1:N | rank-1 | rank-5 | G1 TPIR@FPIR=0.01 |" in table


def test_cli_eval_ijb(run, ijb_root, tmp_path, capsys) -> None:
    from facekd.cli import main

    image = _lines(ijb_root, "face_tid_mid")[0].split()[0]
    (ijb_root / "loose_crop" / image).unlink()
    assert main(["eval", str(run), "--ijb", str(ijb_root), "--out", str(tmp_path / "out"), "--device", "cpu"]) != 0
    assert f"template 1: image {image} has no image file" in capsys.readouterr().err
    assert main(["eval", str(run), "--ijb", str(ijb_root), "--ijb-skip-missing", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| IJBC TAR@FAR |" in printed and "| IJBC 1:N |" in printed and "skipped 1 images without landmarks or files; 0 templates" in printed
    assert (tmp_path / "out" / "roc_IJBC.png").is_file()


def test_cli_ijb_flags_are_checked(run, ijb_root, tmp_path, capsys) -> None:
    from facekd.cli import main

    other = tmp_path / "benchmark"
    ijb_root.rename(other)
    assert main(["eval", str(run), "--ijb", str(other), "--out", str(tmp_path / "out")]) == 2
    assert "cannot tell IJB-B from IJB-C by the folder name; give --ijb-name IJBB|IJBC" in capsys.readouterr().err
    assert main(["eval", str(run), "--megaface", str(other), "--ijb-skip-missing"]) == 2
    assert "--ijb-name and --ijb-skip-missing go with --ijb ROOT" in capsys.readouterr().err
