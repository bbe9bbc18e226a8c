"""Build and install idefics3_kit: ``pip install --no-build-isolation -e .``.

``--no-build-isolation`` matters: the C++ extension compiles against the torch already
installed in the environment (the CPU wheel here), and an isolated build would download an
unpinned torch with gigabytes of CUDA packages.
"""

from setuptools import find_packages, setup

setup(
    name="idefics3_kit",
    version="0.1.0",
    description="The Idefics3 vision-language model as swappable, registered parts",
    packages=find_packages(include=["idefics3_kit", "idefics3_kit.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors", "tokenizers", "pillow", "numpy", "jinja2", "tqdm"],
    entry_points={"console_scripts": ["idefics3-kit=idefics3_kit.cli:main"]},
    package_data={"idefics3_kit": ["assets/*.png", "assets/demo_model/*"]},
)
