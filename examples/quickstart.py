#!/usr/bin/env python3
"""Quick start: make two tiny models in a temporary folder, merge them with karcher, and show the result.

    python examples/quickstart.py
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import merge  # noqa: E402


def tiny_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 64, generator=g),
        "model.norm.weight": torch.ones(16) + 0.1 * torch.randn(16, generator=g),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="merge-quickstart-") as folder:
        folder = Path(folder)
        models = []
        for seed, name in enumerate(["a.safetensors", "b.safetensors"]):
            save_file(tiny_model(seed), str(folder / name))
            models.append(str(folder / name))
        output = folder / "merged.safetensors"
        argv = ["--method", "karcher", "--models", *models, "--alphas", "0.4", "0.6", "--output", str(output)]
        print("python merge.py " + " ".join(argv))
        code = merge.main(argv)
        if code != 0:
            return code
        with safe_open(str(output), "pt") as merged:
            recipe = json.loads(merged.metadata()["merge_recipe"])
            print(f"\nwrote {output.name}: {len(list(merged.keys()))} tensors, recipe {recipe['merge_method']} "
                  f"with weights {[m['parameters']['weight'] for m in recipe['models']]}")
            a, b = tiny_model(0), tiny_model(1)
            for name in merged.keys():
                tensor = merged.get_tensor(name)
                print(f"  {name:<38} {str(list(tensor.shape)):<9} norm {tensor.norm():7.3f} "
                      f"(inputs {a[name].norm():7.3f}, {b[name].norm():7.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
