"""Tiny models built on the spot, in every input form the tool reads."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def llama_like(seed: int, dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 8,
               vocab: int = 16) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict with a scalar, an empty tensor and integer and bool buffers."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    state = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for k in range(layers):
        prefix = f"model.layers.{k}"
        state[f"{prefix}.self_attn.q_proj.weight"] = rand(hidden, hidden)
        state[f"{prefix}.mlp.up_proj.weight"] = rand(2 * hidden, hidden)
        state[f"{prefix}.input_layernorm.weight"] = rand(hidden)
    state["model.norm.weight"] = rand(hidden)
    state["lm_head.weight"] = rand(vocab, hidden)
    state["logit_scale"] = rand()  # 0-D
    state["empty"] = torch.zeros(0, hidden, dtype=dtype)
    state["position_ids"] = torch.arange(12).reshape(1, 12)
    state["mask"] = torch.tensor([True, False, True])
    return state


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def save_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 2,
                 config: dict | None = None) -> Path:
    """A Hugging Face folder: shards written by safetensors itself plus an index we write by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / file_name))
        weight_map.update(dict.fromkeys(part, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "torch_dtype": "float32"}))
    return folder


def save_bin(path: Path, state: dict[str, torch.Tensor], wrap: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state} if wrap else state, str(path))
    return path


def load(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of an output file or folder, read with safetensors itself."""
    from safetensors import safe_open

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def metadata(path: Path | str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def tree_hash(*paths: Path) -> str:
    """One digest of every file's bytes and name under the given paths."""
    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            digest.update(str(f).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def run(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    import merge

    def invoke(*argv):
        code = merge.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture
def three_models(tmp_path):
    """Three single-file fp32 models with the same layout."""
    return [save_safetensors(tmp_path / f"m{i}.safetensors", llama_like(i)) for i in range(3)]


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
