"""Facts a GPU run must record before anything else: `python -m bench.device_report env|extension`.

``env``: the interpreter, torch/triton/transformers versions, ``nvcc --version``, ``CUDA_HOME``,
the device's name, capability and memory, and which SDPA backends run the engine's decode
attention call (``decode_attention``: query heads folded per KV head, over a strided K/V view
of a slot cache, with a boolean mask).
``extension``: which build of ``mahalo_engine._C`` loaded, that its CUDA kernel is registered,
and the GPU architectures inside the shared object (``cuobjdump --list-elf``); exits 1 if the
CUDA kernel is missing, so a device run stops after a bad build instead of failing every test.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not found on PATH"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip()


def _sdpa_backends() -> list[str]:
    """One line per SDPA backend: does it run the engine's decode-attention call, and how fast.

    The engine's exact call (``mahalo_engine.layers.attention.decode_attention``, what
    ``Decoder.decode`` runs per layer): a bf16 query ``[B, 1, H, hd]`` whose G heads per KV head
    are folded onto the query axis, over K/V read as a strided view of the slot cache
    (``KVCache.read`` of a slot range up to the runner's ``kv_len``), with the boolean causal mask
    ``[B, 1, 1, kv_len]`` from the slots' lengths."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig

    # Imported here, like torch: the env report must run where neither imports.
    from bench.decode import QWEN25_05B
    from mahalo_engine.cache import KVCache
    from mahalo_engine.model_config import ModelConfig
    from mahalo_engine.layers.attention import decode_attention

    dev = torch.device("cuda")
    # One layer of Qwen2.5-0.5B (14 query heads on 2 KV heads: G = 7, hd 64): 8 slots of 4097
    # positions, read over a prefix of 1024 with every slot 1000 tokens long.
    shape = dict(QWEN25_05B, num_hidden_layers=1)
    config = ModelConfig.from_dict(AutoConfig.for_model(**shape).to_dict())
    b, kv_len = 8, 1024
    cache = KVCache.allocate(config, b, 4097, dtype=torch.bfloat16, device=dev)
    cache.data.normal_()
    k, v = cache.read(0, slice(0, b), kv_len)
    q = torch.randn(b, 1, config.num_attention_heads, config.head_dim, device=dev,
                    dtype=torch.bfloat16)
    lens = torch.full((b,), 1000, device=dev)
    mask = (torch.arange(kv_len, device=dev)[None, :] <= lens[:, None])[:, None, None, :]
    lines = [f"sdpa call: q {tuple(q.shape)} folded to [B, n_kv, G, hd]; k/v {tuple(k.shape)} "
             f"strides {k.stride()} (a slot-cache view); mask {tuple(mask.shape)}"]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        for masked in (False, True):
            m = mask if masked else None
            try:
                with sdpa_kernel([backend]):
                    decode_attention(q, k, v, m)
                    torch.cuda.synchronize()
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    for _ in range(20):
                        decode_attention(q, k, v, m)
                    end.record()
                    end.synchronize()
                result = f"runs, {start.elapsed_time(end) / 20 * 1e3:.1f} us/call"
            except RuntimeError as e:
                result = f"not usable ({str(e).splitlines()[0][:120]})"
            lines.append(f"sdpa {backend.name:<20} mask={masked!s:<5} {result}")
    return lines


def env() -> int:
    import torch

    print("python", sys.executable, sys.version.split()[0])
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
          torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for name in ("triton", "transformers", "safetensors", "tokenizers"):
        try:
            print(name, __import__(name).__version__)
        except ImportError:
            print(name, "not installed")
    from torch.utils.cpp_extension import CUDA_HOME

    print("CUDA_HOME", CUDA_HOME, "| env CUDA_HOME", os.environ.get("CUDA_HOME"))
    print(_run(["nvcc", "--version"]).splitlines()[-1:])
    print(_run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                "--format=csv,noheader"]))
    if not torch.cuda.is_available():
        print("torch sees no CUDA device")
        return 1
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} capability {p.major}.{p.minor} SMs {p.multi_processor_count} "
          f"memory {p.total_memory / 2**30:.1f} GiB")
    print("sdpa enabled: flash", torch.backends.cuda.flash_sdp_enabled(), "mem_efficient",
          torch.backends.cuda.mem_efficient_sdp_enabled(), "cudnn",
          torch.backends.cuda.cudnn_sdp_enabled(), "math", torch.backends.cuda.math_sdp_enabled())
    for line in _sdpa_backends():
        print(line)
    return 0


def extension() -> int:
    import torch

    # Imported here, like torch: the env report must run where neither imports.
    from mahalo_engine import ops

    how = ops.load_extension()
    so = getattr(sys.modules.get("mahalo_engine._C"), "__file__", None)
    print("extension loaded from", how, so or "(JIT build)")
    cuda = ops.has_cuda_kernels()
    print("CUDA kernel for mahalo::kv_copy_ranges registered:", cuda)
    if so:
        print(_run(["cuobjdump", "--list-elf", so]) or "cuobjdump: no ELF (no device code)")
    if torch.cuda.is_available():
        # One real copy on the device, so a kernel that loads but faults is caught here.
        cache = torch.arange(2 * 2 * 3 * 1 * 8 * 4, dtype=torch.float32, device="cuda")
        cache = cache.view(2, 2, 3, 1, 8, 4)
        want = cache.clone()
        want[:, :, 2, :, 1:5] = want[:, :, 0, :, 1:5]
        idx = lambda *v: torch.tensor(v, dtype=torch.int32, device="cuda")
        ops.kv_copy_ranges(cache, idx(0), idx(2), idx(1), idx(5))
        ok = torch.equal(cache, want)
        print("kv_copy_ranges on the device equals the expected copy:", ok)
        cuda = cuda and ok
    return 0 if cuda else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["env", "extension"])
    args = p.parse_args(argv)
    return env() if args.what == "env" else extension()


if __name__ == "__main__":
    sys.exit(main())
