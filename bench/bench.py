#!/usr/bin/env python3
"""Time and memory of merges on a model family made on the spot, next to the I/O floor.

    python bench/bench.py                          # 1 GB fp32 Llama-shaped family, the default methods
    python bench/bench.py --methods linear,karcher --size-gb 0.25 --dtype bfloat16

For each method it prints our wall time and peak RSS, the I/O floor of the same job (read every input,
write an output-sized file with fsync, page cache warm), the ratio (wall - bare import) / floor, and the
memory bound (bare import + (models + 2) x largest tensor + 300 MB). Figures only: nothing is asserted.

Methods that use a base merge the fine-tunes onto the family's base; the pruning methods run at density
0.5 and sce at select_topk 0.5 (at the default 1 they prune nothing). `--mergekit PATH/mergekit-yaml`
also times mergekit 0.1.5 on the same job (weight 1 per model, float32) and prints the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGE = ROOT / "merge.py"
DEFAULT_METHODS = ("linear,sma,ema,wma,karcher,passthrough,task_arithmetic,ties,dare_linear,dare_ties,della,"
                   "della_linear,breadcrumbs,breadcrumbs_ties,sce,ram,ramplus_tl,slerp,nuslerp,multislerp,"
                   "model_stock,nearswap,arcee_fusion,karcher+base,yoyo_fusion,magmax")


def llama_family(folder: Path, size_gb: float, fine_tunes: int, dtype: str) -> list[Path]:
    """A base and fine-tunes (base + small noise), Llama-shaped, saved as 2-shard Hugging Face folders."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8
    layers = max(1, round((size_gb * 1e9 / itemsize - 2 * vocab * hidden - hidden) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for k in range(layers):
        p = f"model.layers.{k}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "torch_dtype": dtype, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "tie_word_embeddings": False}
    names = list(shapes)
    half = len(names) // 2
    paths = []
    generator = torch.Generator().manual_seed(0)
    for index in range(fine_tunes + 1):
        path = folder / ("base" if index == 0 else f"ft{index}")
        paths.append(path)
        if (path / "model.safetensors.index.json").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for shard, part in enumerate((names[:half], names[half:]), start=1):
            tensors = {}
            for name in part:
                base_gen = torch.Generator().manual_seed(hash(name) % (2**31))
                value = torch.randn(shapes[name], generator=base_gen) * 0.02
                if index:
                    value += torch.randn(shapes[name], generator=generator) * 0.002
                tensors[name] = value.to(getattr(torch, dtype))
            file_name = f"model-{shard:05d}-of-00002.safetensors"
            save_file(tensors, str(path / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
            del tensors
        total = sum(os.path.getsize(path / f) for f in set(weight_map.values()))
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def weight_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.glob("*.safetensors"))]


def read_all(files: list[Path]) -> int:
    total = 0
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    for f in files:
        with open(f, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return total


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input and write (and fsync) an output of the same size."""
    started = time.perf_counter()
    read_all(inputs)
    chunk = bytes(64 << 20)
    target = scratch / "floor.bin"
    with open(target, "wb", buffering=0) as handle:
        left = out_bytes
        while left > 0:
            left -= handle.write(chunk[: min(left, len(chunk))])
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def timed(command: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak RSS in bytes (the child's maximum resident set), exit code, stderr tail."""
    wrapper = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run(wrapper + command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if wrapper:
        *rest, last = done.stderr.strip().splitlines() or ["0"]
        peak = int(last) * 1024 if last.isdigit() else 0
        err = "\n".join(rest)
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        err = done.stderr
    return seconds, peak, done.returncode, err[-500:]


def largest_tensor(paths: list[Path]) -> int:
    sys.path.insert(0, str(ROOT))
    from io_utils import open_model

    model = open_model(str(paths[0]), str(paths[0]), lambda kind, message: None)
    largest = max(info.numel for info in model.infos.values())
    model.close()
    return largest


# Methods that take the family's base and this many of its fine-tunes (None: all), with their flags.
WITH_BASE = {"slerp": (1, ["--t", "0.5"]), "nearswap": (1, ["--t", "0.001"]), "arcee_fusion": (1, []),
             "nuslerp": (2, []), "multislerp": (None, []), "model_stock": (None, []), "karcher+base": (None, [])}
# Parameters that make each method do its real work: at mergekit's default density 1 the pruning
# methods prune nothing (and mergekit's selection, the slow part, never runs).
JOB_PARAMS = {
    **dict.fromkeys(["ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
                     "breadcrumbs_ties"], {"density": 0.5}),
    "sce": {"select_topk": 0.5},
}


def registered(name: str):
    sys.path.insert(0, str(ROOT))
    import methods

    return methods.REGISTRY[methods.canonical_name(name.removesuffix("+base"))]


def method_args(name: str, paths: list[Path]) -> tuple[list[str], list[Path]]:
    """Our command line for the method (after --method), and the model folders it reads.

    `karcher+base` is mergekit's karcher: --method karcher with --base.
    """
    base, tunes = paths[0], paths[1:]
    if name == "passthrough":
        return ["--models", str(base)], [base]
    if name in WITH_BASE:
        count, flags = WITH_BASE[name]
        models = tunes[:count]
        return ["--base", str(base), "--models", *map(str, models), *flags], [base, *models]
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in JOB_PARAMS.get(name, {}).items()]
    if registered(name).random:
        flags += ["--seed", "0"]
    if registered(name).uses_base:
        return ["--base", str(base), "--models", *map(str, tunes), *flags], paths
    return ["--models", *map(str, tunes), *flags], tunes


MERGEKIT_HAS = {"linear", "passthrough", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
                "breadcrumbs", "breadcrumbs_ties", "sce", "ram", "ramplus_tl", "slerp", "nuslerp", "multislerp",
                "model_stock", "nearswap", "arcee_fusion", "karcher+base"}


def mergekit_recipe(name: str, paths: list[Path]) -> str | None:
    """The same job as a mergekit YAML recipe (JSON is YAML), weight 1 per model as our CLI default; None
    for the methods mergekit does not have."""
    if name not in MERGEKIT_HAS:
        return None
    arguments, inputs = method_args(name, paths)
    base, tunes = paths[0], [p for p in inputs if p != paths[0]]
    if name == "passthrough":
        return json.dumps({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": str(base)}]})
    shared = {flag.lstrip("-").replace("-", "_"): float(value) for flag, value in zip(arguments, arguments[1:])
              if flag in ("--t",)}  # the geometric methods' flags in WITH_BASE
    shared.update({k: v for k, v in JOB_PARAMS.get(name, {}).items() if k != "density"})
    per_model = {"weight": 1.0, **{k: v for k, v in JOB_PARAMS.get(name, {}).items() if k == "density"}}
    if name in ("model_stock", "karcher+base", "slerp", "nearswap", "arcee_fusion", "sce"):
        per_model.pop("weight")  # mergekit takes no weights for these
    recipe = {"merge_method": name.removesuffix("+base"), "dtype": "float32", "base_model": str(base),
              "models": [{"model": str(t), **({"parameters": per_model} if per_model else {})} for t in tunes],
              "parameters": shared}
    if not registered(name).uses_base and name != "karcher+base":
        recipe.pop("base_model")
    return json.dumps(recipe)


# mergekit 0.1.5 on this machine's 1 GB family (../shared/spec/decisions.md §9): the 5x target applies
# to the methods it needs 25 s or more for; the others are I/O-bound, with a target against the floor.
MERGEKIT_SECONDS = {"linear": 12, "task_arithmetic": 12, "slerp": 14, "nuslerp": 15, "nearswap": 12,
                    "model_stock": 16, "passthrough": 9, "karcher+base": 75, "multislerp": 29,
                    "arcee_fusion": 27, "dare_linear": 29, "dare_ties": 36, "della": 86, "della_linear": 104,
                    "breadcrumbs": 103, "breadcrumbs_ties": 107, "sce": 94, "ties": 99, "ram": 41,
                    "ramplus_tl": 40}


def target(name: str, wall: float, ratio: float) -> str:
    """The issue's target for this method and whether this run meets it."""
    spec = MERGEKIT_SECONDS.get(name)
    if spec is not None and spec >= 25:
        return f"{'met' if wall * 5 <= spec else 'not met'} ({spec / wall:.1f}x mergekit's {spec} s)"
    scope = registered(name).scope
    limit = 1.15 if scope == "element-wise" else 1.5
    return f"{'met' if ratio <= limit else 'not met'} (ratio <= {limit})"


def best(runs: int, measure):
    """The fastest of `runs` measurements (the machine is shared; the minimum is the least disturbed)."""
    results = [measure() for _ in range(runs)]
    return min(results, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each model")
    parser.add_argument("--fine-tunes", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--workdir", type=Path, default=None, help="where the family is kept (default: a temp folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    parser.add_argument("--merge-args", default="", help="more flags for every merge, e.g. '--svd-solver lowrank'")
    parser.add_argument("--mergekit", metavar="MERGEKIT_YAML",
                        help="also time this mergekit-yaml (mergekit 0.1.5) on the same jobs")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for RESULTS.md)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    need = args.size_gb * 1e9 * (args.fine_tunes + 1) * 1.1 + 2 * args.size_gb * 1e9
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"bench: {workdir} has {free / 1e9:.1f} GB free; this bench needs {need / 1e9:.1f} GB")

    started = time.perf_counter()
    paths = llama_family(workdir / f"family-{args.dtype}-{args.size_gb:g}", args.size_gb, args.fine_tunes, args.dtype)
    print(f"family: {len(paths)} models of {sum(f.stat().st_size for f in weight_files(paths[:1])) / 1e9:.2f} GB "
          f"({args.dtype}) in {workdir} (made or found in {time.perf_counter() - started:.0f} s)")
    read_all(weight_files(paths))  # warm the page cache, as the floor is defined

    bare_s, bare_rss, _, _ = best(args.repeat, lambda: timed([sys.executable, "-c", "import torch, safetensors"]))
    help_s, _, _, _ = best(args.repeat, lambda: timed([sys.executable, str(MERGE), "--help"]))
    largest = largest_tensor(paths)
    print(f"machine: {os.cpu_count()} cores; bare `import torch, safetensors`: {bare_s:.2f} s, "
          f"{bare_rss / 1e6:.0f} MB RSS; `merge.py --help`: {help_s:.2f} s")
    print(f"largest tensor: {largest / 1e6:.1f} M elements; best of {args.repeat} run(s) each\n")
    columns = ["method", "models", "wall s", "floor s", "ratio", "raw", "peak MB", "bound MB", "target"]
    if args.mergekit:
        columns += ["mergekit s", "mergekit MB", "speed-up"]
    table = Table(columns, args.markdown)
    out = workdir / "out"
    for name in args.methods.split(","):
        arguments, inputs = method_args(name, paths)
        out_file = out / f"{name}.safetensors"
        command = [sys.executable, str(MERGE), "--method", name.removesuffix("+base"), *arguments,
                   "--output", str(out_file), "--quiet", "--device", args.device, *shlex.split(args.merge_args)]

        def merge_once():
            out_file.unlink(missing_ok=True)  # else the run would also pay for deleting the last run's output
            return timed(command)

        wall, peak, code, err = best(args.repeat, merge_once)
        if code != 0:
            print(f"{name}: failed ({code}): {err}")
            continue
        out_bytes = out_file.stat().st_size
        floor = min(io_floor(weight_files(inputs), out_bytes, out) for _ in range(args.repeat))
        width = 4 if registered(name).compute != "promoted" else {"float32": 4}.get(args.dtype, 2)
        bound = bare_rss + (len(inputs) + 2) * largest * width + 300e6
        ratio = (wall - bare_s) / floor
        row = [name, len(inputs), f"{wall:.2f}", f"{floor:.2f}", f"{ratio:.2f}", f"{wall / floor:.2f}",
               f"{peak / 1e6:.0f}", f"{bound / 1e6:.0f}", target(name, wall, ratio)]
        out_file.unlink()
        if args.mergekit:
            row += time_mergekit(args.mergekit, name, paths, out, wall)
        table.add(row)


class Table:
    """Rows printed as they come: aligned text, or Markdown."""

    def __init__(self, columns: list[str], markdown: bool):
        self.markdown = markdown
        self.widths = [max(len(c), 8) for c in columns]
        self.widths[0], self.widths[-1] = 17, 0
        self._print(columns)
        print("|---" * len(columns) + "|" if markdown else "-" * (sum(self.widths) + 40))

    def add(self, row: list) -> None:
        self._print([str(cell) for cell in row])

    def _print(self, cells: list[str]) -> None:
        if self.markdown:
            print("| " + " | ".join(cells) + " |", flush=True)
        else:
            print(cells[0].ljust(self.widths[0]) + "".join(c.rjust(w + 2) if w else "  " + c
                                                           for c, w in zip(cells[1:], self.widths[1:])), flush=True)


def time_mergekit(mergekit_yaml: str, name: str, paths: list[Path], out: Path, our_wall: float) -> list[str]:
    text = mergekit_recipe(name, paths)
    if text is None:
        return ["n/a", "", ""]
    recipe = out / f"{name}.mergekit.yml"
    recipe.write_text(text)
    target_folder = out / f"{name}.mergekit"
    shutil.rmtree(target_folder, ignore_errors=True)
    wall, peak, code, err = timed([mergekit_yaml, str(recipe), str(target_folder), "--random-seed", "0", "--quiet"])
    shutil.rmtree(target_folder, ignore_errors=True)
    recipe.unlink()
    if code != 0:
        return [f"failed ({code}): {err.strip().splitlines()[-1] if err.strip() else ''}", "", ""]
    return [f"{wall:.2f}", f"{peak / 1e6:.0f}", f"{wall / our_wall:.1f}x"]


if __name__ == "__main__":
    main()
