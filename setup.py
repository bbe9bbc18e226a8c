"""Build and install idefics3_kit: ``pip install --no-build-isolation -e .``.

``--no-build-isolation`` matters: the C++ extension compiles against the torch already
installed in the environment (the CPU wheel here), and an isolated build would download an
unpinned torch with gigabytes of CUDA packages.

The extension ``idefics3_kit._C`` is built with torch.utils.cpp_extension and ninja:
- CPU (always): csrc/ops.cpp (schemas) + csrc/cpu/*.cpp (kernels) + csrc/python/*.cpp (the compiled
  fast-path checks, functions of the _C module), headers in csrc/include;
- CUDA, when torch has CUDA and CUDA_HOME is set, or FORCE_CUDA=1: also csrc/cuda/*.cu and
  csrc/cuda/*_binding.cpp (TORCH_CUDA_ARCH_LIST honoured; default sm_80 and sm_90 + PTX).
Environment knobs: IDEFICS3_KIT_SKIP_EXT=1 (pure Python install, reference ops only),
DEBUG=1 (-O0 -g), MAX_JOBS (ninja parallelism), FORCE_CUDA=1.
What was built is written to idefics3_kit/_build_info.json (see ``idefics3_kit.ops.build_info()``).
"""

import glob
import json
import os
import platform
import re
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "idefics3_kit", "_build_info.json")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch, cuda_home) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not torch.version.cuda or cuda_home is None:
            raise RuntimeError(f"FORCE_CUDA=1 needs a CUDA build of torch and CUDA_HOME (nvcc); this torch is "
                               f"{torch.__version__} (cuda {torch.version.cuda}), CUDA_HOME={cuda_home}")
        return True  # build the kernels even where no GPU is visible (CI, build machines)
    return bool(torch.version.cuda) and cuda_home is not None


def _cuda_arch_flags():
    """-gencode flags; TORCH_CUDA_ARCH_LIST (if set) is honoured by torch itself instead."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]


def _extensions():
    if os.environ.get("IDEFICS3_KIT_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # an isolated build (plain `pip install .`) has no torch to compile against
        if _building():
            raise SystemExit(
                f"idefics3_kit: cannot build the C++ extension: torch is not importable in the build environment "
                f"({exc}).\nThe extension compiles against the torch you have installed, so install it with:\n\n"
                f"    pip install torch && pip install --no-build-isolation .\n\n(or IDEFICS3_KIT_SKIP_EXT=1 "
                f"pip install . for a pure-Python install that runs the reference ops). A plain `pip install .` "
                f"builds in an isolated environment and would have to download another torch (with CUDA: "
                f"gigabytes) that your installed torch may not be ABI-compatible with.")
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-function", "-fno-math-errno"]
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                   + glob.glob(os.path.join(ROOT, "csrc", "python", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    use_cuda = _want_cuda(torch, CUDA_HOME)
    kwargs = dict(name="idefics3_kit._C", include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
        nvcc = opt + ["--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"] + _cuda_arch_flags()
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx + ["-DIDEFICS3_KIT_CUDA"], "nvcc": nvcc},
                            **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    _write_build_info(torch, use_cuda, sources, cxx, debug)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _building() -> bool:
    """Whether this run compiles or installs (not metadata or an sdist, which need no torch)."""
    return any(cmd in sys.argv for cmd in ("build_ext", "bdist_wheel", "editable_wheel", "develop", "install",
                                            "build"))


def _version() -> str:
    """``__version__`` from idefics3_kit/version.py, its one home (read, not imported: importing needs torch)."""
    with open(os.path.join(ROOT, "idefics3_kit", "version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _torch_requirement(ext_modules) -> str:
    """The extension's C++ ABI is the torch it was built against: require that release exactly."""
    if not ext_modules:
        return "torch>=2.4"
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def _write_build_info(torch, use_cuda, sources, cxx, debug):
    """What the extension is built from, for ``idefics3_kit.ops.build_info()`` (like xformers' cpp_lib.json)."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": use_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or ("8.0;9.0+PTX" if use_cuda else None),
        "sources": sources,
        "cxx_flags": cxx,
        "debug": debug,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=2)


ext_modules, cmdclass = _extensions()

setup(
    name="idefics3_kit",
    version=_version(),
    description="The Idefics3 vision-language model as swappable, registered parts",
    packages=find_packages(include=["idefics3_kit", "idefics3_kit.*"]),
    python_requires=">=3.10",
    install_requires=[_torch_requirement(ext_modules), "safetensors", "tokenizers", "pillow", "numpy", "jinja2"],
    extras_require={"progress": ["tqdm"], "train": ["tqdm", "peft", "datasets", "pyyaml"],
                    "hub": ["huggingface_hub"], "serve": ["fastapi", "uvicorn"]},
    entry_points={"console_scripts": ["idefics3-kit=idefics3_kit.cli:main"]},
    include_package_data=True,
    package_data={"idefics3_kit": ["_build_info.json", "py.typed"],
                  "idefics3_kit.recipes.demo": ["assets/*.png", "assets/demo_model/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
