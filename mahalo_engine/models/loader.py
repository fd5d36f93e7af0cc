"""Strict safetensors checkpoints: load a Hugging Face directory (single file or sharded index) into
a ``Decoder``, and save a ``Decoder`` back as a directory that transformers also loads.

Strict means every tensor the model expects is on disk with the expected shape and nothing else
is: each violation is a ValueError naming the tensor. Shapes are checked from the file headers
before any data is read. Two documented exceptions: a tied-embedding config may omit
``lm_head.weight`` (the usual case) or carry one equal to the embedding (any other value is an
error, since the tie would silently drop it); and the ``rotary_emb.inv_freq`` buffers some old
conversions saved are skipped (they are recomputed from the config).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from safetensors.torch import save_file

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.utils.safetensors_io import open_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_ignored_tensor(name: str) -> bool:
    """A checkpoint tensor that is not a parameter (a stored rotary ``inv_freq`` buffer): skipped
    when loading, never an unexpected tensor."""
    return _IGNORED.search(name) is not None
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {name: root / fname for name, fname in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")


def _disk_shapes(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and dtype names of every tensor listed in ``files``, read from headers only."""
    shapes, dtypes = {}, {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with open_safetensors(f) as h:
            present = set(h.keys())
            unlisted = sorted(n for n in present - set(names) if not is_ignored_tensor(n))
            if unlisted:  # a sharded checkpoint's tensor that the index forgot
                raise ValueError(f"{f} stores tensors that {INDEX_FILE} does not list for it: "
                                 f"{unlisted}")
            for name in names:
                if name not in present:
                    raise ValueError(f"tensor {name!r} is listed for {f.name} but not stored in it")
                sl = h.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = sl.get_dtype()
    return shapes, dtypes


def check_tensor_shapes(where: str, shapes: Mapping[str, Sequence[int]],
                        expected: Mapping[str, Sequence[int]], optional: Collection[str] = ()) -> None:
    """Strict loading of named tensors (``shapes``: name -> shape) into a module whose state dict
    has ``expected``: every expected tensor present (``optional`` ones may be absent), nothing
    else, each of its expected shape. One ValueError, starting with ``where``, names every
    missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(shapes) - set(optional))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{n}: {tuple(shapes[n])}, expected {tuple(expected[n])}"
             for n in sorted(set(shapes) & set(expected)) if tuple(shapes[n]) != tuple(expected[n])]
    problems = [f"{what} tensors: {names}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if names]
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _default_dtype(config: ModelConfig, stored: str) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's ``dtype`` (v5) or ``torch_dtype`` (v4) key,
    else the dtype ``model.embed_tokens.weight`` is stored in."""
    name = config.raw.get("dtype") or config.raw.get("torch_dtype")
    if name is not None:
        by_name = {v: k for k, v in _DTYPE_NAMES.items()}
        if name not in by_name:
            raise TypeError(f"config.json names dtype {name!r}; supported: {list(by_name)} "
                            "(or pass dtype=)")
        return by_name[name]
    if stored not in _SAFETENSORS_DTYPES:
        raise TypeError(f"model.embed_tokens.weight is stored as {stored}; pass dtype= one of "
                        f"{list(_DTYPE_NAMES.values())}")
    return _SAFETENSORS_DTYPES[stored]


def load_decoder(path: str | Path, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, config: ModelConfig | None = None
                 ) -> Decoder:
    """Build a ``Decoder`` from a Hugging Face directory. ``dtype`` None is transformers'
    ``"auto"``: the dtype config.json names, else that of ``model.embed_tokens.weight`` on disk.
    ``device`` None is the CPU."""
    root = Path(path)
    config = config or ModelConfig.from_pretrained(root)
    device = torch.device(device or "cpu")
    files = checkpoint_files(root)
    files = {n: f for n, f in files.items() if not is_ignored_tensor(n)}
    shapes, dtypes = _disk_shapes(files)

    with torch.device("meta"):
        model = Decoder(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    check_tensor_shapes(f"checkpoint {root}", shapes,
                        {name: t.shape for name, t in model.state_dict().items()}, optional)

    if dtype is None:
        dtype = _default_dtype(config, dtypes["model.embed_tokens.weight"])
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty re-creates parameters, breaking the tie

    params = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    tied_head_on_disk = None
    with torch.no_grad():
        for f, names in by_file.items():
            with open_safetensors(f, device) as h:
                for name in names:
                    if name in optional:
                        tied_head_on_disk = h.get_tensor(name).to(dtype)
                        continue
                    params[name].copy_(h.get_tensor(name))
    if tied_head_on_disk is not None and not torch.equal(tied_head_on_disk,
                                                         model.model.embed_tokens.weight):
        raise ValueError(
            f"checkpoint {root}: tie_word_embeddings is true but lm_head.weight on disk differs "
            "from model.embed_tokens.weight; set tie_word_embeddings to false in config.json to "
            "keep a separate head"
        )
    return model.eval()


def save_checkpoint(out_dir: str | Path, model: Decoder, tokenizer=None, *,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (and ``tokenizer`` if given) as a Hugging Face directory: config.json,
    ``model.safetensors`` or shards + ``model.safetensors.index.json`` above ``max_shard_bytes``,
    tokenizer files. A tied model is saved without ``lm_head.weight``, as transformers does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))

    raw = dict(config.raw)
    dtype_name = _DTYPE_NAMES[model.dtype]
    # transformers v5 writes "dtype", older versions "torch_dtype": update whichever are there,
    # since load_decoder's default dtype reads them.
    for key in [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]:
        raw[key] = dtype_name
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
