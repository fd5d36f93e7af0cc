"""The documented public path of the KV-cache ops (``mahalo_engine.ops``, docs/design.md); their
owner is `mahalo_engine.kv_ops`."""
from mahalo_engine.kv_ops import (has_cuda_kernels, kv_append, kv_append_ranges, kv_copy_ranges,
                                  kv_fork, kv_promote, load_extension)

__all__ = ["load_extension", "has_cuda_kernels", "kv_copy_ranges", "kv_fork", "kv_promote",
           "kv_append_ranges", "kv_append"]
