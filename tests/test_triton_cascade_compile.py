"""Cascade attention kernels compile ahead of time for sm_90 at the launcher's default tiles, with
their register and spill counts printed (``pytest -s``) and a failure on any spill.

Same approach as tests/test_triton_multihead_compile.py (a subprocess without TRITON_INTERPRET, arguments
specialised the way Triton's JIT does); the counts come from ``ptxas -v`` (Triton's own ptxas)
on the generated PTX, so no GPU is needed.
"""
import json
import os
import re
import subprocess
import tempfile

import pytest
import torch

from aot_subprocess import compiled_fixture
from triton_kernels.cascade.launcher import LOG2E, extend_launch_config, launch_config
from triton_kernels.device import DOT_PRECISION

H100_SMEM_PER_BLOCK = 227 * 1024
NUM_SMS = 132
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (R, K, n_kv, G, head_dim, prefix bound, suffix capacity, dtype): Qwen2.5-0.5B (the issue's
# target shape), Llama-3-8B-like GQA 4 at head_dim 128, the widest query tile (K·G = 64 and 128),
# head_dim 80 (padded tile), fp32.
SHAPES = {
    "qwen05b-k5-bf16": (8, 5, 2, 7, 64, 2048, 64, torch.bfloat16),
    "llama8b-k8-bf16": (4, 8, 8, 4, 128, 8192, 64, torch.bfloat16),
    "k8-gqa8-hd128-fp16": (2, 8, 4, 8, 128, 4096, 32, torch.float16),
    "k16-gqa7-hd128-bf16": (1, 16, 2, 7, 128, 4096, 32, torch.bfloat16),
    "k4-mha-hd80-fp16": (16, 4, 16, 1, 80, 1024, 64, torch.float16),
    "k4-gqa4-hd128-fp32": (2, 4, 4, 4, 128, 1024, 64, torch.float32),
}


def _launches(r, k, n_kv, g, hd, tp, ts, dtype):
    cfg = launch_config(r, k, n_kv, g, hd, tp, dtype, num_sms=NUM_SMS)
    t = "*" + _TYPES[dtype]
    h = n_kv * g
    partial = dict(
        q_ptr=t, pk_ptr=t, pv_ptr=t, plen_ptr="*i32", sk_ptr=t, sv_ptr=t, slen_ptr="*i32",
        part_o_ptr="*fp32", part_lse_ptr="*fp32", n_kv=n_kv, K=k, chunk=cfg.chunk,
        n_splits=cfg.n_splits, qk_scale=hd ** -0.5 * LOG2E, stride_qr=k * h * hd,
        stride_qk=h * hd, stride_qh=hd, stride_pr=n_kv * tp * hd, stride_ph=tp * hd,
        stride_pt=hd, stride_sr=k * n_kv * ts * hd, stride_sk=n_kv * ts * hd, stride_sh=ts * hd,
        stride_st=hd, stride_pl=1, stride_lr=k, stride_lk=1)
    consts = dict(G=g, HEAD_DIM=hd, BLOCK_D=cfg.block_d, BLOCK_Q=cfg.block_q, BLOCK_G=cfg.block_g,
                  BLOCK_N=cfg.block_n, BLOCK_NS=cfg.block_ns, DOT_PRECISION=DOT_PRECISION,
                  UPCAST_DOT=False)
    merge = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", out_ptr=t, n_kv=n_kv, K=k,
                 n_parts=cfg.n_splits + 1, stride_or=k * h * hd, stride_ok=h * hd, stride_oh=hd)
    merge_consts = dict(G=g, HEAD_DIM=hd, BLOCK_D=cfg.block_d, BLOCK_Q=cfg.block_q)
    return [("_cascade_partials_kernel", partial, consts, cfg.num_warps, cfg.num_stages),
            ("_cascade_merge_kernel", merge, merge_consts, cfg.num_warps, 1)]


# The extend kernels (a PRM scoring K candidate steps of up to T tokens): (R, K, T, n_kv, G,
# head_dim, prefix bound, suffix capacity, dtype). Qwen2.5-0.5B shape with 16-token steps, GQA 4
# at head_dim 128, MHA at head_dim 80, one short step, fp32.
EXTEND_SHAPES = {
    "extend-qwen05b-k5-t16-bf16": (8, 5, 16, 2, 7, 64, 2048, 17, torch.bfloat16),
    "extend-llama8b-k8-t32-bf16": (4, 8, 32, 8, 4, 128, 8192, 33, torch.bfloat16),
    "extend-k4-mha-hd80-t8-fp16": (16, 4, 8, 16, 1, 80, 1024, 9, torch.float16),
    "extend-k2-gqa2-t1-fp16": (2, 2, 1, 2, 2, 64, 512, 2, torch.float16),
    "extend-k4-gqa4-hd128-t8-fp32": (2, 4, 8, 4, 4, 128, 1024, 9, torch.float32),
}


def _extend_launches(r, k, t, n_kv, g, hd, tp, ts, dtype):
    cfg = extend_launch_config(r, k, t, n_kv, g, hd, tp, dtype, num_sms=NUM_SMS)
    ty = "*" + _TYPES[dtype]
    h = n_kv * g
    partial = dict(
        q_ptr=ty, pk_ptr=ty, pv_ptr=ty, plen_ptr="*i32", sk_ptr=ty, sv_ptr=ty, slen_ptr="*i32",
        nnew_ptr="*i64", part_o_ptr="*fp32", part_lse_ptr="*fp32", n_kv=n_kv, K=k, T=t,
        chunk=cfg.chunk, n_splits=cfg.n_splits, qk_scale=hd ** -0.5 * LOG2E,
        stride_qr=k * t * h * hd, stride_qk=t * h * hd, stride_qt=h * hd, stride_qh=hd,
        stride_pr=n_kv * tp * hd, stride_ph=tp * hd, stride_pt=hd,
        stride_sr=k * n_kv * ts * hd, stride_sk=n_kv * ts * hd, stride_sh=ts * hd, stride_st=hd,
        stride_pl=1, stride_lr=k, stride_lk=1, stride_nr=k, stride_nk=1)
    consts = dict(G=g, HEAD_DIM=hd, BLOCK_D=cfg.block_d, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
                  BLOCK_NS=cfg.block_ns, DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=False)
    merge = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", nnew_ptr="*i64", out_ptr=ty,
                 n_kv=n_kv, K=k, T=t, n_parts=cfg.n_splits + 1, stride_or=k * t * h * hd,
                 stride_ok=t * h * hd, stride_ot=h * hd, stride_oh=hd, stride_nr=k, stride_nk=1)
    merge_consts = dict(G=g, HEAD_DIM=hd, BLOCK_D=cfg.block_d, BLOCK_Q=cfg.block_q)
    return [("_cascade_extend_partials_kernel", partial, consts, cfg.num_warps, cfg.num_stages),
            ("_cascade_extend_merge_kernel", merge, merge_consts, cfg.merge_warps, 1)]


def _ptxas_usage(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if proc.returncode != 0 or not regs or not spills:
        raise RuntimeError(f"ptxas -v failed or printed no usage:\n{text}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack": int(stack.group(1)) if stack else 0}


def compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from test_triton_multihead_compile import _specialise

    from triton_kernels.cascade import kernels as cascade_kernels

    results = {}
    launches = {**{name: _launches(*shape) for name, shape in SHAPES.items()},
                **{name: _extend_launches(*shape) for name, shape in EXTEND_SHAPES.items()}}
    for name, kernels in launches.items():
        results[name] = []
        for kernel_name, args, consts, num_warps, num_stages in kernels:
            fn = getattr(cascade_kernels, kernel_name)
            try:
                signature, constexprs, attrs = _specialise(fn, args, consts)
                src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=num_warps, num_stages=num_stages))
                results[name].append({"kernel": kernel_name, "shared": compiled.metadata.shared,
                                      "num_warps": num_warps,
                                      **_ptxas_usage(compiled.asm["ptx"])})
            except Exception as exc:  # reported per shape by the test below
                results[name].append({"kernel": kernel_name, "error": f"{type(exc).__name__}: {exc}"})
    return results


compiled = compiled_fixture(__file__)


@pytest.mark.parametrize("name", list(SHAPES) + list(EXTEND_SHAPES))
def test_cascade_kernels_compile_for_sm90_without_spills(compiled, name):
    for result in compiled[name]:
        assert "error" not in result, f"{result['kernel']}: {result.get('error')}"
        print(f"{name} {result['kernel']} triton {compiled['triton']}: {result['registers']} registers, "
              f"{result['spill_stores']} B spill stores, {result['spill_loads']} B spill loads, "
              f"{result['stack']} B stack, {result['shared']} B shared, {result['num_warps']} warps")
        assert result["shared"] <= H100_SMEM_PER_BLOCK, result
        assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result


if __name__ == "__main__":
    import triton

    print(json.dumps({**compile_all(), "triton": triton.__version__}))
