"""The shared argument rules: ints that are not bools (``triton_kernels.checks``), the sampling
options checked alike by the kernels and the engine, and the strict tensor-name/shape check of
every loader (``mahalo_engine.models.loader.check_tensor_shapes``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mahalo_engine.engine import Boundary, SearchConfig
from mahalo_engine.models.loader import check_tensor_shapes
from triton_kernels import multihead_sample
from triton_kernels.argcheck import check_int, is_int, is_real
from triton_kernels.checks import check_sampling


@pytest.mark.parametrize("value, int_, real", [
    (3, True, True), (np.int64(3), True, True), (0, True, True), (True, False, False),
    (False, False, False), (3.0, False, True), (np.float32(0.5), False, True), ("3", False, False),
    (None, False, False), (torch.tensor(3), False, False),
])
def test_is_int_and_is_real_reject_bools(value, int_, real):
    assert is_int(value) is int_
    assert is_real(value) is real


@pytest.mark.parametrize("value, low, high, message", [
    (True, 1, None, "n must be an int >= 1, got True"),
    (0, 1, None, "n must be an int >= 1, got 0"),
    (2.0, 1, None, "n must be an int >= 1, got 2.0"),
    (9, 0, 8, r"n must be an int in \[0, 8\], got 9"),
])
def test_check_int_names_the_value(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int("n", value, low, high)
    check_int("n", low, low, high)  # the bound itself is accepted


@pytest.mark.parametrize("make", [
    lambda: SearchConfig(candidates=True),
    lambda: SearchConfig(max_steps=0),
    lambda: Boundary(strings=("\n",), min_tokens=False),
])
def test_bools_are_not_counts_in_engine_options(make):
    with pytest.raises(ValueError, match="must be an int >= 1, got (True|0|False)"):
        make()


@pytest.mark.parametrize("option, value", [("top_k", -1), ("top_k", True), ("seed", -1),
                                           ("seed", True), ("temperature", float("nan")),
                                           ("temperature", True), ("top_p", 0.0),
                                           ("top_p", float("inf")), ("min_p", 1.5),
                                           ("min_p", True)])
def test_engine_and_kernels_reject_sampling_options_alike(option, value):
    """One rule: a search config and the fused sampler refuse the same value with one message."""
    with pytest.raises(ValueError) as by_config:
        SearchConfig(**{option: value})
    hidden, heads, weights = torch.randn(2, 8), torch.randn(2, 16, 8), torch.full((2, 2), 0.5)
    with pytest.raises(ValueError) as by_kernel:
        multihead_sample(hidden, heads, weights, **{option: value})
    config_msg, kernel_msg = str(by_config.value), str(by_kernel.value)
    assert config_msg.startswith(f"{option} must be ") and config_msg.endswith(f"got {value!r}")
    if value is not True:  # a bool is a type error; the kernels also name the tensor form there
        assert config_msg == kernel_msg
    else:
        assert kernel_msg.startswith(f"{option} must be ") and kernel_msg.endswith("got True")


def test_host_only_sampling_options_reject_tensors():
    with pytest.raises(ValueError, match=r"temperature must be a real number, got tensor\(0\.5"):
        check_sampling(torch.tensor(0.5), 0, 0)
    with pytest.raises(ValueError, match=r"seed must be an int, got tensor\(\[3\]\)"):
        check_sampling(1.0, 0, torch.tensor([3]))
    check_sampling(torch.tensor(0.5), 0, torch.tensor([3]), device=torch.device("cpu"), batch=2)


def test_check_tensor_shapes_names_every_offending_tensor():
    expected = {"a": (2, 3), "b": (4,), "c": (1,), "tied": (5,)}
    got = {"a": torch.Size([3, 2]), "b": (4,), "extra": (1,)}
    with pytest.raises(ValueError) as err:
        check_tensor_shapes("ckpt", got, expected, optional={"tied"})
    assert str(err.value) == ("ckpt: missing tensors: ['c']; unexpected tensors: ['extra']; "
                              "mis-shaped tensors: ['a: (3, 2), expected (2, 3)']")
    check_tensor_shapes("ckpt", {"a": (2, 3), "b": (4,), "c": (1,)}, expected, optional={"tied"})
    with pytest.raises(ValueError, match=r"ckpt: missing tensors: \['tied'\]$"):
        check_tensor_shapes("ckpt", {"a": (2, 3), "b": (4,), "c": (1,)}, expected)
