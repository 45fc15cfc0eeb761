"""Tiny Llama-shaped models made on the spot, for the examples (no download, a few KB each)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_state(seed: int, layers: int = 4, hidden: int = 16, vocab: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for k in range(layers):
        state[f"model.layers.{k}.self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        state[f"model.layers.{k}.mlp.up_proj.weight"] = torch.randn(4 * hidden, hidden, generator=g)
        state[f"model.layers.{k}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    state["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return state


def save_folder(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face model folder: weights, config.json and a stand-in tokenizer file."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    layers = len({n.split(".")[2] for n in state if n.startswith("model.layers.")})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers,
                                                  "hidden_size": 16, "vocab_size": 32, "torch_dtype": "float32"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return path
