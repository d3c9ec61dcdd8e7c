"""facekd centres: class centres of a teacher on shards, stored as its head; resumable, several ranks."""
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import facekd.train as train_module
from facekd.centres import compute_centres
from facekd.cli import main
from facekd.config import job_from_dict
from facekd.data.convert import read_manifest
from facekd.errors import ConfigError
from facekd.models import build_backbone
from facekd.models.insightface import import_insightface, to_insightface
from facekd.network import load_network
from facekd.train import Trainer

# 6 identities x 8 images = 48 samples in 3 shards; batches of 5 leave a last batch of 3
BATCH = 5


def _train(job: dict):
    return Trainer(job_from_dict(job), progress=False).fit()


@pytest.fixture
def small_teacher(tiny_job):
    job = tiny_job("teacher", train={"steps": 2})
    _train(job)
    return job["train"]["output_dir"]


def test_centres_are_the_normalised_mean_of_normalised_flip_summed_embeddings(small_teacher, tiny_data, tmp_path):
    checkpoint = compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "out", batch_size=BATCH,
                                 num_workers=0, progress=False, device="cpu")
    network = load_network(checkpoint)
    assert network.job.data.manifest == str((tiny_data / "shards").resolve())
    # the reference: every image of the RecordIO source embedded on its own, in float64
    from facekd.data.loader import build_train_loader, to_float

    teacher = load_network(small_teacher, with_head=False).backbone.double()
    loader = build_train_loader(tiny_data / "shards", batch_size=48, image_size=32, num_workers=0, shuffle_buffer=0,
                                resampled=False, flip=False, uint8_pixels=True)
    batch = next(iter(loader))
    images = to_float(batch.images).double()
    with torch.no_grad():
        embedding = F.normalize(teacher(images) + teacher(images.flip(-1)), dim=1)
    expected = F.normalize(torch.zeros(6, 16, dtype=torch.float64).index_add_(0, batch.labels, embedding), dim=1)
    assert sorted(batch.labels.tolist()) == sorted(label for label in range(6) for _ in range(8))  # each sample once
    torch.testing.assert_close(network.head.weight.detach().double(), expected, rtol=0, atol=1e-5)
    # the source run is untouched, the new one holds its backbone
    assert torch.equal(network.backbone.stem[0].weight, load_network(small_teacher).backbone.stem[0].weight)


def test_interrupted_run_resumes_bit_identically(small_teacher, tiny_data, tmp_path, monkeypatch):
    whole = compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "whole", batch_size=BATCH,
                            num_workers=0, save_every=3, progress=False, device="cpu")

    # a run killed in its 5th batch: progress was saved after the 3rd
    calls = {"n": 0}
    forward = torch.nn.Module.__call__

    def dying(module, *args, **kwargs):
        if module.__class__.__name__ == "IResNet":
            calls["n"] += 1
            if calls["n"] > 8:  # two forwards per batch (image and flip)
                raise KeyboardInterrupt
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "resumed", batch_size=BATCH,
                        num_workers=0, save_every=3, progress=False, device="cpu")
    monkeypatch.setattr(torch.nn.Module, "__call__", forward)
    progress = torch.load(tmp_path / "resumed" / "centres" / "rank_00000.pt", weights_only=True)
    assert progress["batches"] == 3 and int(progress["counts"].sum()) == 3 * BATCH

    # other settings may not continue it
    with pytest.raises(ConfigError, match="other settings"):
        compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "resumed", batch_size=BATCH + 1,
                        num_workers=0, progress=False, device="cpu")
    resumed = compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "resumed", batch_size=BATCH,
                              num_workers=1, save_every=3, progress=False, device="cpu")
    assert torch.equal(load_network(resumed).head.weight, load_network(whole).head.weight)
    assert not (tmp_path / "resumed" / "centres").exists()  # progress removed once the head is written


def test_imported_zoo_teacher_distils_a_student_with_its_own_normalisation(tiny_data, tiny_job, tmp_path,
                                                                           monkeypatch):
    torch.manual_seed(0)
    torch.save(to_insightface(build_backbone("mobilefacenet_arcface_torch")), tmp_path / "backbone.pth")
    assert main(["import", "insightface", str(tmp_path / "backbone.pth"), "--arch", "mbf",
                 "--out", str(tmp_path / "zoo")]) == 0
    assert main(["centres", str(tmp_path / "zoo"), "--data", str(tiny_data / "shards"), "--batch-size", "16",
                 "--workers", "0", "--device", "cpu"]) == 0
    teacher = load_network(tmp_path / "zoo")
    assert teacher.head.num_classes == read_manifest(tiny_data / "shards")[0]["num_classes"]
    assert teacher.job.model.normalize == "arcface_torch"

    seen = []
    forward = train_module._forward

    def recording(backbone, images, with_stages):
        seen.append((backbone.__class__.__name__, images.detach().clone()))
        return forward(backbone, images, with_stages)

    monkeypatch.setattr(train_module, "_forward", recording)
    job = tiny_job("student", data={"image_size": 112}, train={"steps": 1, "batch_size": 4},
                   distill={"methods": {"gkd": 1.0}, "teacher": str(tmp_path / "zoo")}, head={"s": 64.0, "m2": 0.5})
    summary = _train(job)
    assert summary["step"] == 1
    student, zoo = (images for name, images in seen if name == "IResNet"), (images for name, images in seen
                                                                            if name == "MobileFaceNet")
    student_images, teacher_images = next(student), next(zoo)
    # each network saw the same pixels, normalised as it was trained: x·128 + 127.5 and x·127.5 + 127.5 are the pixels
    pixels = (student_images.double() * 128 + 127.5).round()
    torch.testing.assert_close(teacher_images.double(), (pixels - 127.5) / 127.5, rtol=0, atol=1e-6)
    assert not torch.equal(student_images, teacher_images)


@pytest.mark.slow
def test_centres_of_a_trained_teacher_agree_with_its_head(tiny_job, tiny_data, tmp_path):
    # A margin-softmax head's row c is pulled toward the embeddings of class c and pushed from the others, so a
    # teacher trained to a low loss has rows close to its class means. Random 16-d directions have |cos| ~ 0.25;
    # measured after 150 steps: 0.88-0.97. Below 0.8 (or a centre nearer another class's row) means the centres
    # are not the teacher's classes.
    job = tiny_job("trained", train={"steps": 150, "checkpoint_every": 150, "log_every": 50})
    _train(job)
    checkpoint = compute_centres(job["train"]["output_dir"], tiny_data / "shards", out=tmp_path / "centres",
                                 batch_size=BATCH, num_workers=0, progress=False, device="cpu")
    head = F.normalize(load_network(job["train"]["output_dir"]).head.weight.detach(), dim=1)
    centres = load_network(checkpoint).head.weight.detach()
    cosine = head @ centres.T
    assert cosine.diagonal().min() > 0.8
    assert torch.equal(cosine.argmax(dim=0), torch.arange(6))


@pytest.mark.slow
def test_two_ranks_give_the_one_process_centres(small_teacher, tiny_data, tmp_path):
    one = compute_centres(small_teacher, tiny_data / "shards", out=tmp_path / "one", batch_size=BATCH,
                          num_workers=0, progress=False, device="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
               "-m", "facekd", "centres", str(small_teacher), "--data", str(tiny_data / "shards"), "--out",
               str(tmp_path / "two"), "--batch-size", str(BATCH), "--workers", "0", "--device", "cpu"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    two = load_network(tmp_path / "two")
    # the same sums, added in another order (each rank its shards, then one all-reduce)
    torch.testing.assert_close(two.head.weight, load_network(one).head.weight, rtol=0, atol=1e-6)
