#!/usr/bin/env python3
"""A frankenmerge: stack layers of two 4-layer models into a 6-layer one with passthrough slices.

    python examples/frankenmerge.py
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge  # noqa: E402
from tiny import save_folder, tiny_state  # noqa: E402

RECIPE = """\
merge_method: passthrough
slices:
  - sources:
      - model: ./a
        layer_range: [0, 3]
  - sources:
      - model: ./b
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="merge-franken-") as folder:
        os.chdir(folder)
        save_folder(Path("a"), tiny_state(1))
        save_folder(Path("b"), tiny_state(2))
        Path("recipe.yml").write_text(RECIPE)
        print(RECIPE)
        code = merge.main(["--config", "recipe.yml", "--output", "franken/"])
        if code == 0:
            config = json.loads(Path("franken/config.json").read_text())
            print(f"franken/ has {config['num_hidden_layers']} layers (a's 0-2, then b's 1-3 with o_proj halved)")
        return code


if __name__ == "__main__":
    raise SystemExit(main())
