"""facekd: distillation of compact face-recognition networks at million-identity scale.

The repository keeps ``kernels/`` and ``distributed/`` at the top level (see DESIGN.md), but both
names are taken on PyPI, so they install only inside the ``facekd`` namespace.
"""
from setuptools import setup

setup(
    name="facekd",
    version="0.1.0",
    description="Knowledge distillation of compact face-recognition networks at million-identity scale",
    python_requires=">=3.10",
    packages=[
        "facekd",
        "facekd.bench",
        "facekd.data",
        "facekd.distill",
        "facekd.models",
        "facekd.kernels",
        "facekd.distributed",
    ],
    package_dir={
        "facekd": "facekd",
        "facekd.kernels": "kernels",
        "facekd.distributed": "distributed",
    },
    install_requires=[
        "torch>=2.5,<2.14",
        "triton>=3.1",
        "deepspeed>=0.15",
        "ray[default,train]>=2.30",  # default: the dashboard and Job Submission server of `ray start --head`
        "webdataset>=0.2.90",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "pillow>=10",
        "tensorboard>=2.14",
        "onnx>=1.15",  # facekd export --onnx
        "onnxruntime>=1.17",  # the export's check against torch
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2"]},
    entry_points={"console_scripts": ["facekd=facekd.cli:main"]},
)
