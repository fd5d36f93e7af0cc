"""Cascade (shared-prefix) attention: K candidates of a request read its committed prefix once.

One folder, one op: ``kernels.py`` (Triton: partials over prefix chunks and candidate suffixes,
then a log-sum-exp merge), ``launcher.py`` (launch configs and the device dispatch),
``cpu.py`` (the CPU path), ``reference.py`` (the pure-torch spec). Public names:
`cascade_decode_attention` (one new token per candidate) and `cascade_extend_attention` (a
ragged run of new tokens per candidate, causal over its own suffix).
"""
from triton_kernels.cascade.launcher import (CascadeConfig, ExtendConfig, cascade_decode_attention,
                                             cascade_extend_attention, extend_launch_config,
                                             launch_config)

__all__ = ["cascade_decode_attention", "cascade_extend_attention", "CascadeConfig", "ExtendConfig",
           "launch_config", "extend_launch_config"]
