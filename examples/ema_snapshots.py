#!/usr/bin/env python3
"""EMA over a run's training snapshots: a folder of checkpoints, merged in name order.

    python examples/ema_snapshots.py
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge  # noqa: E402
from tiny import tiny_state  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="merge-ema-") as folder:
        run = Path(folder) / "run"
        run.mkdir()
        state = tiny_state(0)
        for step in (100, 200, 300, 400):  # a drifting training run
            state = {n: t + 0.05 * torch.randn_like(t) for n, t in state.items()}
            save_file(state, str(run / f"step-{step:04d}.safetensors"))  # zero-padded: name order = step order
        output = Path(folder) / "ema.safetensors"
        argv = ["--method", "ema", "--alpha", "0.3", "--models", str(run), "--output", str(output)]
        print("python merge.py " + " ".join(argv))
        code = merge.main(argv)
        if code == 0:
            print(f"EMA of 4 snapshots written to {output.name} ({output.stat().st_size} bytes); "
                  "the last snapshot weighs 0.3, the first 0.343 x ... (see README)")
        return code


if __name__ == "__main__":
    raise SystemExit(main())
