"""Every Triton kernel of the multi-head op (triton_kernels.multihead) compiles ahead of time for sm_90
(H100), on any machine.

The interpreter never lowers a kernel, so a GPU-only compile error (a non-constexpr global, a
shape the backend rejects, too much shared memory) would otherwise first show up on a GPU. The
compile runs in a subprocess without TRITON_INTERPRET (under it ``triton.jit`` builds interpreter
objects that cannot be compiled); it needs ptxas, which Triton ships.
"""
import json
import os
import subprocess

import pytest
import torch

from aot_subprocess import compiled_fixture
from triton_kernels.checks import MAX_TOP_K
from triton_kernels.device import DOT_PRECISION
from triton_kernels.multihead.kernels import MODE_FILTER, MODE_TOPK
from triton_kernels.multihead.launcher import filters, launch_config, sampling_mode
from triton_kernels.multihead.merge_kernel import merge_config

H100_SMEM_PER_BLOCK = 227 * 1024  # opt-in maximum of dynamic shared memory per block on sm_90

# Argument values as the launchers pass them for a decode step of a Qwen2.5-0.5B-shaped policy
# (V = 151936, d = 896, H = 3) on an H100 (132 SMs): a tensor is its pointer type, a number is
# specialised the way Triton's JIT does at launch (== 1 → constexpr, multiple of 16 → divisibility
# hint). Tiles and warps come from the launcher's own launch_config.
V, D, H, NUM_SMS = 151936, 896, 3, 132
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_PROJ = dict(V=V, D=D, H=H, stride_xb=D, stride_xd=1, stride_wh=1, stride_hh=V * D, stride_hv=D,
             stride_hd=1)
_PARTS = dict(part_max_ptr="*fp32", part_sumexp_ptr="*fp32", part_best_ptr="*fp32",
              part_token_ptr="*i32", part_scaled_ptr="*fp32")
_NOT_SPECIALISED = {"seed", "offset"}  # do_not_specialize in triton_kernels.multihead.kernels


def _logits(B, dtype):
    cfg = launch_config(B, V, D, dtype, num_sms=NUM_SMS)
    args = dict(hidden_ptr="*" + _TYPES[dtype], weights_ptr="*fp32", heads_ptr="*" + _TYPES[dtype],
                out_ptr="*fp32", B=B, stride_wb=H, stride_ob=V, **_PROJ)
    consts = dict(BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                  DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=False)
    return [("_logits_kernel", args, consts, cfg.num_warps, cfg.num_stages)]


def _sample(B, dtype, temperature, top_k, rng_ptr, temp_stride=None, top_p=1.0, min_p=0.0):
    """The kernels of one multihead_sample call; ``temp_stride`` not None: the temperature is
    a float32 device tensor (stride 1: one per row, 0: one for all rows), ``temperature`` unused.
    ``top_p``/``min_p``: what sampling_mode sees (a tensor: per-row values on the device)."""
    temp_ptr = temp_stride is not None
    mode, kpad = sampling_mode(torch.zeros(()) if temp_ptr else temperature, top_k, V, top_p,
                               min_p)
    filtered = filters(top_p, min_p)
    cfg = launch_config(B, V, D, dtype, num_sms=NUM_SMS, kpad=kpad, filtered=mode == MODE_FILTER)
    rng = dict(seed="*i64", offset="*i64") if rng_ptr else dict(seed=12345, offset=7)
    temp = dict(temp_ptr="*fp32", stride_t=temp_stride if temp_ptr else 0)
    flags = dict(MODE=mode, SEED_IS_PTR=rng_ptr, OFFSET_IS_PTR=rng_ptr, TEMP_IS_PTR=temp_ptr)
    args = dict(hidden_ptr="*" + _TYPES[dtype], weights_ptr="*fp32", heads_ptr="*" + _TYPES[dtype],
                part_keys_ptr="*i64", scaled_ptr="*fp32", stride_sb=V if mode == MODE_FILTER else 0,
                B=B, stride_wb=H, inv_temp=1.0 if temp_ptr else 1.25,
                n_tiles=cfg.n_tiles, tiles_per_part=cfg.tiles_per_part, n_parts=cfg.n_parts,
                **rng, **temp, **_PARTS, **_PROJ)
    consts = dict(LOG_KPAD=kpad.bit_length() - 1, SORT_ROWS=cfg.sort_rows, BLOCK_B=cfg.block_b,
                  LOG_BLOCK_V=cfg.block_v.bit_length() - 1, BLOCK_K=cfg.block_k,
                  DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=False, **flags)
    stride = lambda v: 1 if isinstance(v, torch.Tensor) and v.numel() > 1 else 0  # noqa: E731
    probs = dict(top_p_ptr="*fp32", stride_p=stride(top_p), min_p_ptr="*fp32",
                 stride_mp=stride(min_p))
    finish_args = dict(part_keys_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32", B=B,
                       n_parts=cfg.n_parts, top_k=top_k, **rng, **temp, **_PARTS, **probs)
    finish_consts = dict(BLOCK_R=cfg.finish_rows, BLOCK_P=cfg.finish_parts, TOPK_PAD=kpad,
                         LOG_KPAD=kpad.bit_length() - 1,
                         LOG_CAND_PARTS=cfg.cand_parts.bit_length() - 1,
                         FILTER=mode == MODE_TOPK and filtered, **flags)
    launches = [("_sample_partials_kernel", args, consts, cfg.num_warps, cfg.num_stages)]
    if mode != MODE_FILTER:
        launches.append(("_sample_finish_kernel", finish_args, finish_consts, cfg.finish_warps, 3))
    else:
        filter_args = dict(scaled_ptr="*fp32", stride_sb=V, part_max_ptr="*fp32",
                           part_sumexp_ptr="*fp32", tokens_ptr="*i64", logprobs_ptr="*fp32",
                           V=V, n_parts=cfg.n_parts, top_k=top_k, **rng, **temp, **probs)
        filter_consts = dict(SEED_IS_PTR=rng_ptr, OFFSET_IS_PTR=rng_ptr, TEMP_IS_PTR=temp_ptr,
                             KTH=MAX_TOP_K < top_k < V, BLOCK_P=cfg.finish_parts,
                             BLOCK=cfg.filter_block)
        launches.append(("_sample_filter_kernel", filter_args, filter_consts, cfg.filter_warps, 3))
    return launches


def _merge(U, dtype, d=D):
    u_pad, block, warps = merge_config(U, interpreter=False)
    args = dict(heads_ptr="*" + _TYPES[dtype], rows_ptr="*fp32", out_ptr="*" + _TYPES[dtype],
                N=V * d, U=U, stride_hh=V * d, stride_ou=V * d)
    return [("_merge_kernel", args, dict(H=H, U_PAD=u_pad, BLOCK=block), warps, 1)]


# The launcher's GPU configurations: B = 1, ≤ 16 / ≤ 32 / ≤ 64 row tiles, bf16/fp16/fp32, greedy,
# Gumbel sampling and top-k (up to KPAD = 128), seed/offset as ints or device pointers, the
# temperature as a float or a device tensor (per row, or one for all rows).
CALLS = {
    "logits-bf16-b1": _logits(1, torch.bfloat16),
    "logits-bf16-b64": _logits(64, torch.bfloat16),
    "logits-fp16-b32": _logits(32, torch.float16),
    "logits-fp32-b8": _logits(8, torch.float32),
    "greedy-bf16-b64": _sample(64, torch.bfloat16, 0.0, 0, False),
    "sample-bf16-b1-device-rng": _sample(1, torch.bfloat16, 0.8, 0, True),  # finish: 1 row/program
    "sample-bf16-b8-device-rng": _sample(8, torch.bfloat16, 0.8, 0, True),
    "sample-fp16-b32": _sample(32, torch.float16, 0.8, 0, False),
    "greedy-fp32-b64": _sample(64, torch.float32, 0.0, 0, False),
    "sample-fp32-b8": _sample(8, torch.float32, 1.0, 0, False),
    "topk128-bf16-b64-device-rng": _sample(64, torch.bfloat16, 1.0, 128, True),
    "topk50-fp16-b8": _sample(8, torch.float16, 0.7, 50, False),
    "topk50-bf16-b1-device-rng": _sample(1, torch.bfloat16, 0.7, 50, True),  # sorts 1 row, not 16
    "sample-bf16-b64-device-temps": _sample(64, torch.bfloat16, None, 0, True, temp_stride=1),
    "sample-bf16-b1-device-temp": _sample(1, torch.bfloat16, None, 0, True, temp_stride=0),
    "top1-fp16-b8-device-temp": _sample(8, torch.float16, None, 1, False, temp_stride=0),
    "topk128-bf16-b64-device-temps": _sample(64, torch.bfloat16, None, 128, True, temp_stride=1),
    "topk20-fp32-b8-device-temps": _sample(8, torch.float32, None, 20, True, temp_stride=1),
    "topk64-fp32-b32-device-temps": _sample(32, torch.float32, None, 64, True, temp_stride=1),
    "topk64-bf16-b32-device-temps": _sample(32, torch.bfloat16, None, 64, True, temp_stride=1),
    # top-p / min-p: MODE_FILTER (z/T written, then the filter kernel), top-k candidates filtered
    # in the finish kernel, and a top-k above 128 (the bisection).
    "topp-bf16-b1-device-rng": _sample(1, torch.bfloat16, 0.8, 0, True, top_p=0.9),
    "minp-bf16-b8": _sample(8, torch.bfloat16, 1.0, 0, False, min_p=0.05),
    "minp-fp16-b32": _sample(32, torch.float16, 1.0, 0, False, min_p=0.05),
    "topp-fp32-b8": _sample(8, torch.float32, 0.9, 0, False, top_p=0.9),
    "topp-fp32-b64-device-temps": _sample(64, torch.float32, None, 0, True, temp_stride=1,
                                          top_p=torch.ones(64), min_p=torch.zeros(())),
    "topp-bf16-b64-device-rows": _sample(64, torch.bfloat16, 0.8, 0, True,
                                         top_p=torch.ones(64), min_p=torch.zeros(64)),
    "topk50-topp-bf16-b8": _sample(8, torch.bfloat16, 0.7, 50, False, top_p=0.9, min_p=0.02),
    "topk128-topp-fp16-b64-device-temps": _sample(64, torch.float16, None, 128, True,
                                                  temp_stride=1, top_p=torch.ones(64)),
    "topk1000-topp-bf16-b8": _sample(8, torch.bfloat16, 1.0, 1000, True, top_p=0.95),
    "merge-bf16-u1": _merge(1, torch.bfloat16),
    "merge-bf16-u2-d1536": _merge(2, torch.bfloat16, d=1536),
    "merge-fp32-u2": _merge(2, torch.float32),
}


def _specialise(fn, args: dict, consts: dict) -> tuple[dict, dict, dict]:
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        value = args.get(name)
        if name in consts:
            signature[name] = "constexpr"
        elif isinstance(value, str):  # a tensor: torch allocations are 16-byte aligned
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in _NOT_SPECIALISED:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in _NOT_SPECIALISED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills, stack) of a cubin, from cuobjdump -res-usage (Triton
    ships it); {} when the tool is missing."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key.lower()] = int(m.group(1))
    return usage


def compile_all() -> dict:
    """Compile every call's kernels for sm_90: {name: [{"shared", "cubin", "reg", "stack",
    "local"} or {"error"}, ...]}."""
    import triton
    from triton.backends.compiler import GPUTarget

    from triton_kernels.multihead import kernels, merge_kernel

    target = GPUTarget("cuda", 90, 32)
    results = {}
    for name, launches in CALLS.items():
        results[name] = []
        for kernel_name, args, consts, num_warps, num_stages in launches:
            fn = getattr(kernels, kernel_name, None) or getattr(merge_kernel, kernel_name)
            try:
                signature, constexprs, attrs = _specialise(fn, args, consts)
                src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                attrs=attrs)
                compiled = triton.compile(src, target=target,
                                          options=dict(num_warps=num_warps, num_stages=num_stages))
                results[name].append({"kernel": kernel_name, "shared": compiled.metadata.shared,
                                      "cubin": len(compiled.asm["cubin"]),
                                      "num_warps": num_warps, "num_stages": num_stages,
                                      **_resource_usage(compiled.asm["cubin"])})
            except Exception as exc:  # reported per call by the tests below
                results[name].append({"kernel": kernel_name, "error": f"{type(exc).__name__}: {exc}"})
    return results


compiled = compiled_fixture(__file__)


@pytest.mark.parametrize("name", list(CALLS))
def test_kernels_compile_for_sm90(compiled, name):
    for result in compiled[name]:
        assert "error" not in result, f"{result['kernel']}: {result.get('error')}"
        assert result["cubin"] > 0
        assert result["shared"] <= H100_SMEM_PER_BLOCK, result
        # Printed for the record (pytest -s); spills are local memory (stack frames included).
        print(f"{name} {result['kernel']} triton {compiled['triton']}: "
              f"{result.get('reg', '?')} registers, stack {result.get('stack', '?')} B, "
              f"local {result.get('local', '?')} B, shared {result['shared']} B, "
              f"{result['num_warps']} warps, {result['num_stages']} stages")
        if "local" in result:  # the default configs must not spill (where the tool reports it)
            assert result["local"] == 0 and result.get("stack", 0) == 0, result


if __name__ == "__main__":
    import triton

    print(json.dumps({**compile_all(), "triton": triton.__version__}))
