"""The pure-torch spec of every op, in one place (public: ``triton_kernels.reference.*``).

Each op keeps its reference in its own folder (``triton_kernels.multihead.reference``,
``triton_kernels.cascade.reference``); this module names them together, with the launchers'
signatures, for users who test against them.
"""
from triton_kernels.cascade.reference import (attend_partial, cascade_decode_attention,
                                              cascade_extend_attention, merge_partials,
                                              suffix_query_mask)
from triton_kernels.multihead.reference import (filter_mask, min_p_mask, multihead_logits,
                                                multihead_sample, top_k_mask, top_p_mask)

__all__ = ["multihead_logits", "multihead_sample", "top_k_mask", "top_p_mask", "min_p_mask",
           "filter_mask", "cascade_decode_attention",
           "cascade_extend_attention", "attend_partial", "merge_partials", "suffix_query_mask"]
