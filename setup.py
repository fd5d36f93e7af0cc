"""Builds the one distribution and its C++/CUDA extension ``mahalo_engine._C`` from ``csrc/``.

C++ only against a CPU torch; C++ + CUDA where the installed torch has CUDA and nvcc is found.
Always build with ``pip install --no-build-isolation``: the extension must link against the torch
that will import it.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MAHALO_NO_CUDA") == "1":
        with_cuda = False
    if with_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            "mahalo_engine._C",
            cpp + cu,
            define_macros=[("MAHALO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = CppExtension("mahalo_engine._C", cpp, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
