"""The kv bench's beam_promote cases measure what they claim: 0, 1 and N-1 beams continuing from
another beam's candidate, and a complete promote (every beam's slots end as its source's text,
checked by plain indexing on the fork layout)."""
import pytest
import torch

import bench.kv as kv
from mahalo_engine.layouts import slot_layout


@pytest.mark.parametrize("case", list(kv.BEAM_CASES))
def test_beam_promote_case_moves_and_result(case):
    shape, prefix = (2, 1, 4), kv.PROMPT + 24
    cache = kv._beam_cache("fork", shape, prefix + kv.STEP, torch.device("cpu"))
    data = cache.storage.data
    k = kv.BEAM_K
    # a real step's end: one prompt for all slots, one committed text per beam, own steps
    data[:, :, :, :, :kv.PROMPT] = data[:, :, :1, :, :kv.PROMPT]
    for b in range(kv.BEAMS):
        first = b * k
        data[:, :, first:first + k, :, kv.PROMPT:prefix] = data[:, :, first:first + 1, :,
                                                                 kv.PROMPT:prefix]
    before = data.clone()
    kv._beam_state(cache, prefix)
    layout = slot_layout("fork", k, kv.STEP, beams=kv.BEAMS)
    sources = kv.BEAM_CASES[case]
    index, sizes = layout.promote_index([sources], [0])
    assert sizes[1] // k == {"kept": 0, "one_move": 1, "all_moved": kv.BEAMS - 1}[case]
    cache.promote(*layout.split_promote(index, sizes))
    n = prefix + kv.STEP
    for b, s in enumerate(sources):
        for d in range(b * k, b * k + k):
            torch.testing.assert_close(data[:, :, d, :, :n], before[:, :, s, :, :n], rtol=0, atol=0)
