import os

# Tests run on CPU; DeepSpeed must not look for CUDA on a machine without it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton decides between compiled and interpreted kernels when @triton.jit runs, i.e. when facekd.kernels
# is first imported, which any test module may do: switch the CPU interpreter on before collection.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Run on one torch thread: on the 2-core machine, shared with other test processes, OpenMP's spin-waits make
    two threads per tiny operation several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic data set (6 identities × 8 images at 32 px, 20 pairs) and its shards."""
    from facekd.data.convert import convert_to_shards
    from facekd.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny_data")
    synthesize(root / "data", num_identities=6, images_per_identity=8, num_val_identities=4, num_pairs=20,
               image_size=32, seed=0, show_progress=False)
    convert_to_shards(root / "data" / "rec", root / "shards", shard_size=16, seed=0, show_progress=False)
    return root


@pytest.fixture
def tiny_job(tiny_data, tmp_path):
    """Make job spec dicts for seconds-long CPU runs on ``tiny_data``.

    ``tiny_job(name, **sections)`` writes to ``tmp_path/name``; each keyword updates that section.
    """

    def make(name="tiny", **sections):
        job = {
            "name": name,
            "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0,
                     "shuffle_buffer": 16},
            "model": {"backbone": "iresnet18", "width": 0.125, "embedding_dim": 16},
            "head": {"s": 16.0, "m2": 0.2},
            "optim": {"lr": 0.05, "warmup_steps": 2},
            "train": {"output_dir": str(tmp_path / name), "steps": 6, "batch_size": 8, "checkpoint_every": 2,
                      "log_every": 1, "device": "cpu"},
        }
        for section, values in sections.items():
            job[section] = {**job.get(section, {}), **values}
        return job

    return make
