"""Builds the one distribution and its C++/CUDA extension ``mahalo_engine._C`` from ``csrc/``.

C++ only against a CPU torch; C++ + CUDA against a CUDA torch. A CUDA torch with no CUDA toolkit
found (``CUDA_HOME``/nvcc) is an error, not a silent C++-only build: the engine would then run
without its CUDA kernels. ``MAHALO_NO_CUDA=1`` asks for the C++-only build on purpose. Always build with ``pip install
--no-build-isolation``: the extension must link against the torch that will import it.
``mahalo_engine/ops.py`` compiles the same sources just in time when this build is absent.
"""
import glob
import os

from setuptools import setup


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch's BuildExtension adds the standard its own headers need.
    common = dict(include_dirs=[os.path.abspath("csrc")], depends=sorted(glob.glob("csrc/*.h")))
    with_cuda = torch.version.cuda is not None and os.environ.get("MAHALO_NO_CUDA") != "1"
    if with_cuda and CUDA_HOME is None:
        raise RuntimeError(
            f"torch {torch.__version__} is built with CUDA {torch.version.cuda}, but no CUDA "
            "toolkit was found (set CUDA_HOME or put nvcc on PATH) to compile csrc/*.cu; "
            "set MAHALO_NO_CUDA=1 to build the C++ (CPU) kernels only")
    if with_cuda:
        ext = CUDAExtension(
            "mahalo_engine._C",
            cpp + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            define_macros=[("MAHALO_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            **common,
        )
    else:
        ext = CppExtension("mahalo_engine._C", cpp, extra_compile_args={"cxx": ["-O3"]}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import _extensions
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
