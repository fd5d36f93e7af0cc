"""setup.py's choice of extension: a CUDA torch without a CUDA toolkit is an error, never a
silent C++-only build (the first GPU run would then test no CUDA kernel)."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the working directory
    spec = importlib.util.spec_from_file_location("mahalo_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not called
    return module


def _names(ext):
    return sorted(Path(s).name for s in ext.sources)


def test_cuda_torch_without_toolkit_raises(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("MAHALO_NO_CUDA", raising=False)
    with pytest.raises(RuntimeError, match=r"CUDA 13\.0.*no CUDA toolkit.*MAHALO_NO_CUDA=1"):
        setup_module._extensions()


def test_no_cuda_flag_builds_cpp_only(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setenv("MAHALO_NO_CUDA", "1")
    (ext,), _ = setup_module._extensions()
    assert not any(n.endswith(".cu") for n in _names(ext))
    assert ("MAHALO_WITH_CUDA", None) not in ext.define_macros


def test_cuda_torch_with_toolkit_builds_the_cuda_sources(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("MAHALO_NO_CUDA", raising=False)
    (ext,), _ = setup_module._extensions()
    cu = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert cu and set(cu) <= set(_names(ext))
    assert ("MAHALO_WITH_CUDA", None) in ext.define_macros


def test_cpu_torch_builds_cpp_only(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("MAHALO_NO_CUDA", raising=False)
    (ext,), _ = setup_module._extensions()
    cpp = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))
    assert _names(ext) == cpp


# --- The CUDA build's ninja file, as setup.py's BuildExtension writes it -----------------------
# CPU CI compiles only the .cpp files, so a CUDA build that ninja refuses (two sources with one
# stem -> two rules for one object, a source that is gone) would first show on a GPU machine.
# This runs setup.py's build_ext for real with CUDA faked (a CUDA torch version, a toolkit whose
# nvcc only reports its version), lets torch write build.ninja, and has ninja plan it with -n.

_FAKE_NVCC = """#!/bin/sh
echo "Cuda compilation tools, release 13.0, V13.0.88"
"""


class _Planned(Exception):
    """Stops build_ext after ninja's plan: the objects do not exist, so there is nothing to link."""


def _plan_cuda_build(setup_module, monkeypatch, tmp_path):
    import subprocess
    from setuptools import Distribution

    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "bin" / "nvcc").write_text(_FAKE_NVCC)
    (cuda_home / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    monkeypatch.delenv("MAHALO_NO_CUDA", raising=False)
    monkeypatch.delenv("PYTORCH_NVCC", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # else torch asks the (absent) device

    plans = []

    def ninja_plan(build_directory, verbose, error_prefix):
        proc = subprocess.run(["ninja", "-n"], cwd=build_directory, capture_output=True, text=True)
        ninja_file = Path(build_directory) / "build.ninja"
        plans.append((proc.returncode, proc.stdout + proc.stderr, ninja_file.read_text()))
        raise _Planned

    monkeypatch.setattr(cpp_extension, "_run_ninja_build", ninja_plan)
    ext_modules, cmdclass = setup_module._extensions()
    dist = Distribution({"name": "mahalo-engine", "ext_modules": ext_modules, "cmdclass": cmdclass})
    build_ext = dist.get_command_obj("build_ext")
    build_ext.build_temp = str(tmp_path / "temp")
    build_ext.build_lib = str(tmp_path / "lib")
    build_ext.ensure_finalized()
    with pytest.raises(_Planned):
        build_ext.run()
    (plan,) = plans
    return plan


def test_cuda_build_ninja_file_plans_every_source(setup_module, monkeypatch, tmp_path):
    if not cpp_extension.is_ninja_available():
        pytest.skip("setup.py builds with ninja; ninja is not installed")
    rc, out, ninja_file = _plan_cuda_build(setup_module, monkeypatch, tmp_path)
    assert rc == 0, f"ninja refuses the CUDA build's build.ninja:\n{out}"
    sources = sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc").glob("*.cu"))
    for source in sources:
        rule = "cuda_compile" if source.suffix == ".cu" else "compile"
        assert f": {rule} {source}\n" in ninja_file + "\n", f"{source.name} is not compiled"
    # One compile step per source: none shadowed by another's object.
    assert len(re.findall(r"^\[\d+/\d+\] ", out, re.M)) == len(sources), out
