"""Shared pytest set-up: the `gpu` marker skips without CUDA; Triton's kernels are imported in the
session's mode before any test runs."""
import importlib

import pytest
import torch

# Triton fixes a kernel's mode (interpreted under TRITON_INTERPRET=1, else compiled) when its
# module is imported. Tests that run the engine's CPU path set TRITON_INTERPRET=0 for a while; a
# kernel module first imported then would stay compiled (no driver on a CPU) for every later test
# of this process. So they are imported here, once, in the mode the session was started in.
for _module in ("triton_kernels.multihead.kernels", "triton_kernels.multihead.merge_kernel",
                "triton_kernels.cascade.kernels"):
    importlib.import_module(_module)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
