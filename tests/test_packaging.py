"""What `pip install .` puts in site-packages: facekd and its two mapped folders, nothing top-level else."""
import subprocess
import sys
import zipfile

import pytest


def test_subpackages_import_inside_the_facekd_namespace():
    import facekd.distributed
    import facekd.kernels

    assert facekd.kernels.__name__ == "facekd.kernels" and hasattr(facekd.kernels, "margin_softmax_ce")
    assert facekd.distributed.__name__ == "facekd.distributed"


@pytest.mark.slow
def test_the_wheel_installs_nothing_named_kernels_or_distributed_at_the_top(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("facekd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"facekd"}
    assert "facekd/kernels/margin_ce.py" in names and "facekd/distributed/checkpoint.py" in names
