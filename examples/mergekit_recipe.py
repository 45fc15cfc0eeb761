#!/usr/bin/env python3
"""Run a mergekit YAML recipe as it is: a weighted linear merge with a per-layer gradient and a filter.

    python examples/mergekit_recipe.py
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge  # noqa: E402
from tiny import save_folder, tiny_state  # noqa: E402

RECIPE = """\
merge_method: linear
models:
  - model: ./code-ft
    parameters:
      weight: [0.3, 0.7]                 # grows from the first layer to the last
  - model: ./chat-ft
    parameters:
      weight:
        - filter: mlp
          value: 0.2
        - value: 0.5
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="merge-recipe-") as folder:
        os.chdir(folder)  # model paths in recipes are relative to the working directory, as in mergekit
        save_folder(Path("code-ft"), tiny_state(1))
        save_folder(Path("chat-ft"), tiny_state(2))
        Path("recipe.yml").write_text(RECIPE)
        print(RECIPE)
        for argv in (["--config", "recipe.yml", "--print-config"],
                     ["--config", "recipe.yml", "--output", "merged/"]):
            print("python merge.py " + " ".join(argv))
            code = merge.main(argv)
            if code:
                return code
        print("output folder:", ", ".join(sorted(os.listdir("merged"))))
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
