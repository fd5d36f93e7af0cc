"""Builds the one distribution and its C++/CUDA extension ``mahalo_engine._C`` from ``csrc/``.

C++ only against a CPU torch; C++ + CUDA where the installed torch has CUDA and nvcc is found
(``MAHALO_NO_CUDA=1`` forces the C++-only build). Always build with ``pip install
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
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MAHALO_NO_CUDA") == "1":
        with_cuda = False
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
