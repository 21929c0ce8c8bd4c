"""meliad-tf: long-context transformers (Transformer-XL, Memorizing, Block-Recurrent) in TensorFlow 2."""

import re

import setuptools

# The version is written once, in the package (meliad_tf.__version__).
with open("meliad_tf/__init__.py", encoding="utf-8") as init:
  VERSION = re.search(r'^__version__ = "([^"]+)"$', init.read(), re.MULTILINE).group(1)

# The TF 2.20 family.
INSTALL_REQUIRES = [
    "tensorflow==2.20.0",
    "tensorflow-text==2.20.1",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",  # TFDS datasets prepared as ArrayRecord files
    "importlib_resources==7.1.0",  # tensorflow-datasets imports it without declaring it
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "absl-py==2.5.1",
    "numpy==2.4.6",  # needs Python 3.11 or later
    "matplotlib==3.10.8",
    "tqdm==4.70.1",  # meliad-eval's progress bar
]

CONVERT_REQUIRES = ["msgpack==1.2.4"]
# The `scann` memory backend only; wheels exist for Linux x86-64 alone. Its TF ops are built
# against exactly the pinned TensorFlow.
SCANN_REQUIRES = ["scann[tf]==1.4.2"]

setuptools.setup(
    name="meliad-tf",
    version=VERSION,
    description=__doc__,
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE"],
    python_requires=">=3.11,<3.13",
    packages=(
        setuptools.find_packages(include=["meliad_tf", "meliad_tf.*", "pipelines", "pipelines.*"])
        + ["meliad_configs", "meliad_tools"]
    ),
    package_dir={"meliad_configs": "configs", "meliad_tools": "tools"},
    package_data={"meliad_configs": ["*.gin", "**/*.gin"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Reading Flax's checkpoints (meliad-convert): the msgpack files Meliad writes.
        "convert": CONVERT_REQUIRES,
        # The memory backend `scann` (options/memory_backend_scann.gin).
        "scann": SCANN_REQUIRES,
        # A TPU VM: TensorFlow's TPU build of the pinned release, with libtpu.
        "tpu": ["tensorflow-tpu==2.20.0"],
        # NVIDIA GPUs: the pinned release with its CUDA libraries.
        "gpu": ["tensorflow[and-cuda]==2.20.0"],
        # The emulator lets the slow tests run TensorFlow's gs:// client on 127.0.0.1.
        # ScaNN where it has wheels, so that its tests run there and the rest everywhere.
        "test": (["pytest==9.2.0", "gcp-storage-emulator==2026.7.19"] + CONVERT_REQUIRES
                 + [f"{r}; platform_system == 'Linux' and platform_machine == 'x86_64'"
                    for r in SCANN_REQUIRES]),
    },
    entry_points={
        "console_scripts": [
            "meliad-train=meliad_tools.train:run",
            "meliad-data=meliad_tools.data:run",
            "meliad-vocab=meliad_tools.vocab:run",
            "meliad-bench=meliad_tools.bench:run",
            "meliad-plot=meliad_tools.plot:run",
            "meliad-export=meliad_tools.export:run",
            "meliad-eval=meliad_tools.eval:run",
            "meliad-generate=meliad_tools.generate:run",
            "meliad-convert=meliad_tools.convert:run",
            "meliad-recall=meliad_tools.recall_comparison:run",
        ],
    },
)
