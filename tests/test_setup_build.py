"""setup.py's choice of extension: a CUDA torch without a CUDA toolkit is an error, never a
silent C++-only build (the first GPU run would then test no CUDA kernel)."""
import importlib.util
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
