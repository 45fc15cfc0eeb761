#!/usr/bin/env python3
"""Merge neural-network checkpoints, streaming tensor by tensor.

    python merge.py --method karcher --models a.safetensors b.safetensors --alphas 0.4 0.6 --output merged.safetensors

This module wires the parts together and owns everything the user sees: the command line (built from
the method registry), planning (every check that can fail runs before any tensor data is read), the
streaming run with a read-ahead thread, progress, warnings and exit codes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Sequence

TOOL = "merge-models"
__version__ = "0.1.0"


class _DeferredModule(types.ModuleType):
    """A module whose code runs on first use of one of its attributes.

    Unlike importlib's LazyLoader, reading `__spec__` does not count as use, so a plain `import torch`
    elsewhere binds the name without paying the seconds torch takes to import. The first use runs the
    module's code under a lock; other threads wait for it to finish.
    """

    _lock = threading.RLock()

    def __getattr__(self, attribute: str):
        with self._lock:
            if self.__dict__.get("_running"):  # the module's own code asking for what it has not defined yet
                raise AttributeError(attribute)
            if type(self) is _DeferredModule:
                self.__dict__["_running"] = True
                try:
                    self.__spec__.loader.exec_module(self)
                finally:
                    del self.__dict__["_running"]
                self.__class__ = types.ModuleType
        return getattr(self, attribute)


def _defer_import(name: str) -> None:
    """Import `name` on first use: `--help` must not wait seconds for torch."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules[name] = module


_defer_import("torch")

import methods  # noqa: E402  (after the deferral above)
from io_utils import (  # noqa: E402
    ITEMSIZE, MergeError, Model, OutputLock, OutputTarget, StreamingWriter, TensorInfo, dtype_name,
    existing_weights, extra_files, iter_blocks, open_model, output_target, parse_size, plan_shards,
    resolve_input, torch_dtype,
)

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")
BLOCK = 1 << 22  # elements read per model at a time for element-wise methods (16 MiB of float32)
MAX_INPUT_PATHS = 100


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


# ---------------------------------------------------------------------------------------------------
# reporting


class Reporter:
    """Warnings collected by kind and printed once each; notes and progress on stderr unless quiet.

    Until `flush` first runs (planning succeeded), notes are held back too: a run that fails validation
    prints only its `error:` lines.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.warnings: dict[str, list[str]] = {}
        self.printed: set[str] = set()
        self.held: list[str] | None = []

    def warn(self, kind: str, message: str) -> None:
        self.warnings.setdefault(kind, []).append(message)

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.held is not None:
            self.held.append(message)
        else:
            print(message, file=sys.stderr)

    def flush(self) -> None:
        for message in self.held or []:
            print(message, file=sys.stderr)
        self.held = None
        for kind, messages in self.warnings.items():
            if kind in self.printed:
                continue
            self.printed.add(kind)
            more = f" (and {len(messages) - 1} more like it)" if len(messages) > 1 else ""
            print(f"warning: {messages[0]}{more}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# command line, built from the registry


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage block would bury the one line that matters
        raise MergeError(message)


def param_flags() -> dict[str, list[tuple[methods.Method, methods.Param]]]:
    """Every method-parameter flag, with the methods that declare it."""
    flags: dict[str, list] = defaultdict(list)
    for m in methods.REGISTRY.values():
        for p in m.params:
            flags[p.cli_flag].append((m, p))
    return dict(flags)


def _dest(flag: str) -> str:
    return "param_" + flag.lstrip("-").replace("-", "_")


def build_parser() -> Parser:
    names = "\n".join(f"  {m.name:<12} {m.summary}" for m in methods.REGISTRY.values())
    parser = Parser(
        prog="merge.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints (.safetensors, .bin, Hugging Face folders) tensor by tensor.",
        epilog=f"methods:\n{names}\n\nexit codes: 0 success, 2 bad input or environment, 130 interrupted, 1 internal error",
    )
    parser.add_argument("--method", metavar="NAME", help="merge method (see below)")
    parser.add_argument("--models", nargs="+", metavar="PATH",
                        help="checkpoints: files, model folders, folders of checkpoints (sorted by name), globs")
    parser.add_argument("--base", metavar="PATH", help="base model, for methods that use one")
    parser.add_argument("--output", metavar="PATH", default="merged.safetensors",
                        help="x.safetensors (one file) or dir/ (Hugging Face folder); default merged.safetensors")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: per method, see README)")
    parser.add_argument("--compute-dtype", choices=DTYPE_CHOICES, help="cast inputs to this dtype before merging")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--copy-extra-files", action=argparse.BooleanOptionalAction, default=None,
                        help="copy config and tokenizer files from the base or first model's folder "
                             "(default: on for folder output)")
    parser.add_argument("--shard-size", metavar="SIZE", help="largest shard of a folder output, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--skip-missing", action="store_true", help="merge the tensors all models share; skip the rest")
    parser.add_argument("--sort", choices=("name", "natural"), default="name",
                        help="order of checkpoints expanded from a folder or glob: code-point (default) or natural")
    parser.add_argument("--seed", "--random-seed", type=int, metavar="N",
                        help="seed of random methods: the same seed repeats a merge bit for bit")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress, input order or summary; warnings stay")
    parser.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    parser.add_argument("--version", action="version", version=f"{TOOL} {__version__}")
    group = parser.add_argument_group("method parameters (each used only by the methods named)")
    for flag, users in param_flags().items():
        p = users[0][1]
        # methods that share a flag's meaning are named together, so the task-vector family reads once
        meanings: dict[str, list[str]] = defaultdict(list)
        for m, q in users:
            meanings[f"{q.help} (default {q.default_text}" + (f", {q.range_text()}" if q.range_text() else "")
                     + ")"].append(m.name)
        helps = "; ".join(f"{', '.join(names)}: {meaning}" for meaning, names in meanings.items())
        names = [flag, *p.aliases]
        if p.kind is bool:
            group.add_argument(*names, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None, help=helps)
        elif p.kind is str:
            group.add_argument(*names, dest=_dest(flag), choices=p.choices, default=None, help=helps)
        else:
            metavar = "W" if p.per_model else "X"
            group.add_argument(*names, dest=_dest(flag), nargs="+", metavar=metavar, default=None, help=helps)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(argv)
    if unknown:
        known = [s for a in parser._actions for s in a.option_strings]
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        guess = methods.closest_names(flag.split("=")[0], known) if flag.startswith("-") else []
        hint = f"; did you mean {guess[0]}?" if guess else ""
        raise MergeError(f"unrecognized argument {flag}{hint}")
    if not args.method:
        raise MergeError("--method is required (see --help for the list)")
    if not args.models:
        raise MergeError("--models is required: one or more checkpoints")
    return args


def methods_table() -> str:
    """The README's methods table, generated from the registry (a test keeps the README in step)."""
    rules = {methods.FLOAT32: "float32", methods.FIRST: "first model's", methods.PROMOTED: "inputs' (promoted)",
             methods.BASE: "base's"}
    rows = ["| method | what it does | when to use it | models | base | parameters (CLI flag = default) "
            "| computes in | writes | scope |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods.REGISTRY.values():
        count = (f"{m.min_models}" if m.max_models == m.min_models else
                 f"{m.min_models}–{m.max_models}" if m.max_models else f"≥ {m.min_models}")
        params = "<br>".join(f"`{p.cli_flag}` = {p.default_text}" + (" (per model)" if p.per_model else "")
                             for p in m.params) or "—"
        compute = m.compute.__doc__ if callable(m.compute) else rules.get(m.compute, m.compute)
        rows.append(f"| `{m.name}` | {m.summary} | {m.when} | {count} | {m.base} | {params} | {compute} "
                    f"| {rules.get(m.output, m.output)} | {m.scope} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------
# parameter settings: a scalar, a per-layer gradient (a list) or a list of {filter, value} entries


UNSET = object()


def evaluate(setting, name: str, t: float):
    """The value a setting takes for tensor `name` at layer position t in [0, 1]."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return evaluate(entry["value"], name, t)
        return UNSET
    if isinstance(setting, list):
        if len(setting) == 1:
            return setting[0]
        position = t * (len(setting) - 1)
        if any(isinstance(v, (bool, str)) for v in setting):
            return setting[int(position)]
        low = int(position)
        high = min(low + 1, len(setting) - 1)
        fraction = position - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    return setting


def scalars(setting) -> list:
    """Every plain value inside a setting, for range checks before any tensor is read."""
    if isinstance(setting, dict):
        return scalars(setting.get("value"))
    if isinstance(setting, list):
        return [v for e in setting for v in scalars(e)]
    return [setting]


LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def layer_counts(names: Sequence[str]) -> dict[str, int]:
    """Layers per stack ('model.layers' -> 32), from the first all-digit segment of each name."""
    counts: dict[str, int] = {}
    for name in names:
        match = LAYER.match(name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def layer_position(name: str, counts: dict[str, int]) -> float:
    """t = k / (n - 1) for layer k of a stack of n; 0 for tensors outside the layers."""
    match = LAYER.match(name)
    if not match:
        return 0.0
    count = counts[match.group(1)]
    return int(match.group(2)) / (count - 1) if count > 1 else 1.0


# ---------------------------------------------------------------------------------------------------
# planning


@dataclass
class Job:
    """One output tensor: where its inputs come from and how it is made."""

    name: str
    out: TensorInfo  # dtype and shape written
    sources: list[int]  # indices into Plan.models that are read; with `base`, the base is the last
    params: dict | None = None  # resolved method parameters; None copies sources[0] through unchanged
    compute: str | None = None  # compute dtype name
    func: Callable | None = None  # the method's function, or its element-wise fallback
    scope: str = methods.ELEMENTWISE  # how `func` is fed: chunks, or whole tensors
    base: bool = False  # pass the last source as `base=`
    seed: int | None = None  # the seed of this tensor's generator, for random methods


@dataclass
class Plan:
    method: methods.Method
    models: list[Model]  # every input opened, the base last when there is one
    target: OutputTarget
    jobs: list[Job]
    shards: list[list[tuple[str, TensorInfo]]]
    metadata: dict[str, str]
    extra: dict[str, str | bytes]
    device: str
    overwrite: bool
    output_label: str


def parse_number(text: str, flag: str, method_name: str, kind: type) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MergeError(f"{method_name}: {flag} value '{text}' is not a number") from None
    if not math.isfinite(value):
        raise MergeError(f"{method_name}: {flag} value '{text}' is not a finite number")
    return int(value) if kind is int and value == int(value) else value


def split_values(tokens: Sequence[str]) -> list[str]:
    """`--weights 0.5 0.3`, `--weights 0.5,0.3` and `--weights ""` (= not given) all work."""
    return [part.strip() for token in tokens for part in token.split(",") if part.strip()]


def spelled(p: methods.Param, args: argparse.Namespace) -> str:
    """The flag as the user wrote it (--alphas or --weights), for messages."""
    names = (p.cli_flag, *p.aliases)
    return next((a.split("=")[0] for a in args.argv if a.split("=")[0] in names), p.cli_flag)


def flag_problems(method: methods.Method, args: argparse.Namespace) -> list[str]:
    """Flags given that the method does not use, with a hint towards what was probably meant."""
    problems = []
    declared = {p.cli_flag for p in method.params}
    for flag, users in param_flags().items():
        value = getattr(args, _dest(flag))
        if value is None or flag in declared or (isinstance(value, list) and not split_values(value)):
            continue
        p = users[0][1]
        sibling = next((q for q in method.params if q.name == p.name or (
            {p.cli_flag, *p.aliases} & {"--alpha", "--alphas", "--weights"}
            and {q.cli_flag, *q.aliases} & {"--alpha", "--alphas", "--weights"})), None)
        others = methods.closest_names(method.name, [m.name for m, _ in users])
        suggestion = f"; did you mean --method {others[0]}?" if others else ""
        if sibling is not None:
            what = "one per model" if sibling.per_model else "one number"
            problems.append(f"{method.name} takes {sibling.cli_flag} ({what}), not {flag}{suggestion}")
        else:
            problems.append(f"{flag} is not used by {method.name}{suggestion}")
    return problems


def cli_settings(method: methods.Method, args: argparse.Namespace, count: int) -> tuple[dict, list[dict], list[str]]:
    """Global and per-model settings from the flags, and the problems found in them."""
    shared: dict[str, object] = {}
    per_model: list[dict[str, object]] = [{} for _ in range(count)]
    problems = []
    for p in method.params:
        raw = getattr(args, _dest(p.cli_flag))
        if raw is None:
            continue
        if p.kind in (bool, str):
            shared[p.name] = raw
            continue
        values = split_values(raw)
        if not values:
            continue
        flag = spelled(p, args)
        try:
            numbers = [parse_number(v, flag, method.name, p.kind) for v in values]
        except MergeError as err:
            problems.extend(err.lines)
            continue
        if p.per_model:
            if len(numbers) not in (1, count):
                problems.append(f"{method.name}: {flag} has {len(numbers)} values for {count} models")
                continue
            for i in range(count):
                per_model[i][p.name] = numbers[0] if len(numbers) == 1 else numbers[i]
        else:
            shared[p.name] = numbers[0] if len(numbers) == 1 else numbers
    for p in method.params:
        flag = spelled(p, args)
        if p.per_model:
            problems += [f"{method.name}: {flag} {problem}" + (f" for model {i + 1}" if count > 1 else "")
                         for i, settings in enumerate(per_model) if p.name in settings
                         for v in scalars(settings[p.name]) if (problem := p.problem(v))]
        elif p.name in shared:
            problems += [f"{method.name}: {flag} {problem}" for v in scalars(shared[p.name])
                         if (problem := p.problem(v))]
    return shared, per_model, problems


def resolve_params(method: methods.Method, shared: dict, per_model: list[dict], name: str, t: float) -> dict:
    """Every parameter's value for one tensor: a model's own setting, else the global one, else the default."""
    resolved = {}
    count = len(per_model)
    for p in method.params:
        if p.per_model:
            defaults = p.default(count) if callable(p.default) else [p.default] * count
            values = []
            for i in range(count):
                value = UNSET
                for level in (per_model[i], shared):
                    if p.name in level:
                        value = evaluate(level[p.name], name, t)
                        if value is not UNSET:
                            break
                values.append(defaults[i] if value is UNSET else value)
            resolved[p.name] = values
        else:
            value = evaluate(shared[p.name], name, t) if p.name in shared else UNSET
            resolved[p.name] = p.default if value is UNSET else value
    return resolved


def open_inputs(paths: Sequence[str], natural: bool, reporter: Reporter) -> tuple[list[Model], list[str]]:
    """Open every model (headers only); all failures are reported together."""
    problems, specs = [], []
    for path in paths:
        try:
            expanded = resolve_input(path, natural)
        except MergeError as err:
            problems.extend(err.lines)
            continue
        if expanded is None:
            specs.append((path, path))
            continue
        if not expanded:
            problems.append(f"{path}: no checkpoints in this folder")
            continue
        specs.extend((p, p) for p in expanded)
        names = [os.path.basename(p.rstrip("/")) for p in expanded]
        widths = {len(n) for part in names for n in re.findall(r"\d+", part)}
        if not natural and len(widths) > 1:
            reporter.warn("order", f"{path}: checkpoint names hold numbers of different widths, so code-point "
                                   f"order may not be training order; --sort natural orders them by number")
        reporter.note(f"{path}: {len(expanded)} checkpoints, in this order: " + ", ".join(names))
    models = []
    for path, label in specs:
        try:
            models.append(open_model(path, label, reporter.warn))
        except MergeError as err:
            problems.extend(err.lines)
    seen: dict[str, str] = {}
    for model in models:
        key = os.path.realpath(model.paths[0]) if len(model.files) == 1 else os.path.realpath(model.folder)
        if key in seen:
            problems.append(f"{model.label}: the same model is given twice (also as {seen[key]})")
        seen.setdefault(key, model.label)
    if problems:
        for model in models:
            model.close()
        raise MergeError(*problems)
    return models, [m.label for m in models]


def check_keys(models: list[Model], skip_missing: bool, reporter: Reporter) -> list[str]:
    """Names to write, in the first model's storage order; missing tensors are an error unless skipped."""
    order = models[0].storage_order()
    shared = set(order)
    for m in models[1:]:
        shared &= set(m.infos)
    union = set().union(*(m.infos for m in models))
    missing = sorted(union - shared)
    if missing:
        holes = [f"{name} (missing in {', '.join(m.label for m in models if name not in m.infos)})" for name in missing[:3]]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        if not skip_missing:
            raise MergeError(f"{len(missing)} tensors are not in every model: {'; '.join(holes)}{more}; "
                             f"--skip-missing merges the {len(shared)} shared tensors")
        reporter.warn("missing", f"skipped {len(missing)} tensors that are not in every model: {'; '.join(holes)}{more}")
    return [name for name in order if name in shared]


def check_shapes(models: list[Model], names: list[str]) -> None:
    problems = []
    for name in names:
        infos = [m.infos[name] for m in models]
        if any(info.shape != infos[0].shape for info in infos):
            shapes = ", ".join(f"{m.label} {list(info.shape)}" for m, info in zip(models, infos))
            problems.append(f"tensor {name} has different shapes: {shapes}")
        elif any(info.is_float != infos[0].is_float for info in infos):
            kinds = ", ".join(f"{m.label} {info.dtype}" for m, info in zip(models, infos))
            problems.append(f"tensor {name} is floating point in some models only: {kinds}")
    if problems:
        more = [f"and {len(problems) - 5} more tensors differ"] if len(problems) > 5 else []
        raise MergeError(*problems[:5], *more)


def promoted(dtypes: Sequence[str]) -> str:
    import torch

    result = torch_dtype(dtypes[0])
    for d in dtypes[1:]:
        result = torch.promote_types(result, torch_dtype(d))
    return dtype_name(result)


def compute_dtype(rule: str, dtypes: Sequence[str], base: int = -1) -> str:
    """A dtype rule applied to one tensor's input dtypes (models first, the base last when there is one)."""
    if rule == methods.FIRST:
        return dtypes[0]
    if rule == methods.BASE:
        return dtypes[base]
    if rule == methods.PROMOTED:
        return promoted(dtypes)
    return "float64" if "float64" in dtypes else "float32"


def check_output(target: OutputTarget, output: str, models: list[Model], inputs: Sequence[str], overwrite: bool) -> None:
    out_real = os.path.realpath(os.path.join(target.folder, target.weights_name or ""))
    for model in models:
        for path in model.paths:
            real = os.path.realpath(path)
            if real == out_real or (target.is_folder and os.path.dirname(real) == out_real):
                raise MergeError(f"--output {output} would overwrite the input {model.label}; choose another path")
    for given in inputs:
        if os.path.isdir(given):
            folder = os.path.realpath(given)
            if out_real == folder or out_real.startswith(folder + os.sep):
                raise MergeError(f"--output {output} is inside the input folder {given}; a later run over that "
                                 "folder would take the output for a checkpoint. Choose a path outside it")
    if target.is_folder:
        if os.path.exists(target.folder) and not os.path.isdir(target.folder):
            raise MergeError(f"--output {output}: a file is in the way of this folder")
        found = existing_weights(target.folder)
        if found and not overwrite:
            raise MergeError(f"--output {output} already holds a model ({found[0]}); use --overwrite to replace it")
    else:
        path = os.path.join(target.folder, target.weights_name)
        if os.path.isdir(path):
            raise MergeError(f"--output {output} is a folder; end it with / for a Hugging Face folder output")
        if os.path.exists(path) and not overwrite:
            raise MergeError(f"--output {output} already exists; use --overwrite to replace it")
        if os.path.exists(target.folder) and not os.path.isdir(target.folder):
            raise MergeError(f"--output {output}: {target.folder} is not a folder")


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise MergeError(f"--device {device}: use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise MergeError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are present")
    return device


def seed_metadata(method: methods.Method, models: list[Model], per_model: list[dict], params: dict) -> dict[str, str]:
    """The keys the SafeTensor Model Merger writes, which downstream tools read."""
    if not method.seed_keys:
        return {}
    meta = {
        "merge_method": method.name.upper(),
        "merged_models_count": str(len(models)),
        "source_files": json.dumps([os.path.basename(m.paths[0]) if len(m.files) == 1 else os.path.basename(m.folder)
                                    for m in models]),
    }
    if "alpha" in params:
        meta["alpha"] = str(float(params["alpha"]))
    if "weight" in params:
        given = all("weight" in s for s in per_model)
        meta["weights"] = json.dumps([float(s["weight"]) for s in per_model] if given else params["weight"])
        meta["normalized_weights"] = json.dumps([round(w, 6) for w in methods.normalised(params["weight"])])
    return meta


def recipe(method: methods.Method, labels: list[str], base: str | None, shared: dict, per_model: list[dict],
           args: argparse.Namespace, seed: int | None) -> dict:
    """The resolved recipe, in mergekit's YAML shape, stored in the output so the merge can be repeated."""
    count = len(labels)
    parameters = {p.key: shared.get(p.name, p.default) for p in method.params if not p.per_model}
    models = []
    for i, label in enumerate(labels):
        own = {}
        for p in method.params:
            if p.per_model:
                default = p.default(count)[i] if callable(p.default) else p.default
                value = per_model[i].get(p.name, default)
                if value is not None:
                    own[p.key] = value
        models.append({"model": label, **({"parameters": own} if own else {})})
    result = {"merge_method": method.name, **({"base_model": base} if base else {}), "models": models,
              "parameters": parameters}
    for key, value in (("dtype", args.compute_dtype), ("out_dtype", args.dtype), ("seed", seed)):
        if value is not None:
            result[key] = value
    return result


def updated_config(path: str, out_dtype: str | None) -> bytes | str:
    """config.json with its dtype entries set to the output dtype; the path itself when nothing changes."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return path
    if out_dtype is None or not isinstance(config, dict):
        return path
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == out_dtype for k in keys):
        return path
    for key in keys:
        config[key] = out_dtype
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def find_method(text: str) -> methods.Method:
    name = methods.canonical_name(text)
    if name is None:
        guess = methods.closest_names(text, list(methods.REGISTRY))
        hint = f"; did you mean '{guess[0]}'?" if guess else f" (choose from {', '.join(methods.REGISTRY)})"
        raise MergeError(f"unknown method '{text}'{hint}")
    return methods.REGISTRY[name]


def tensor_seed(seed: int, name: str) -> int:
    """Each tensor's own seed, so that random draws do not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


VOCABULARY = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|lm_head|embed_out)(\.|$)")


def takes_matrix_path(name: str, info: TensorInfo) -> bool:
    """2-D weights take a matrix method's math; embeddings and output heads (vocab x hidden) do not."""
    return len(info.shape) == 2 and not VOCABULARY.search(name)


@dataclass
class Options:
    """What planning needs besides the models: checked output, shard size, device, seed."""

    target: OutputTarget
    shard_size: int
    device: str
    seed: int | None


def check_options(method: methods.Method, args: argparse.Namespace, reporter: Reporter) -> Options:
    problems = flag_problems(method, args)
    if len(args.models) > MAX_INPUT_PATHS:
        problems.append(f"--models takes at most {MAX_INPUT_PATHS} paths (got {len(args.models)})")
    if args.base is not None and method.base == methods.REFUSED:
        problems.append(f"{method.name} takes no --base")
    elif args.base is not None and method.base == methods.UNUSED:
        reporter.warn("base", f"--base {args.base} is ignored: {method.name} does not use a base model")
    elif args.base is None and method.base == methods.REQUIRED:
        problems.append(f"{method.name} needs a base model: give it with --base PATH")
    shard_size = 5 * 10**9
    if args.shard_size is not None:
        try:
            shard_size = parse_size(args.shard_size)
        except ValueError:
            problems.append(f"--shard-size {args.shard_size}: use a size such as 5GB or 500MB")
    target = None
    try:
        target = output_target(args.output)
    except MergeError as err:
        problems.extend(err.lines)
    if args.shard_size is not None and target is not None and not target.is_folder:
        reporter.warn("shard-size", "--shard-size is ignored: the output is a single file")
    device = args.device
    try:
        device = check_device(args.device)
    except MergeError as err:
        problems.extend(err.lines)
    seed = args.seed
    if seed is not None and not 0 <= seed < 2**63:
        problems.append(f"--seed must be between 0 and 2**63 - 1 (got {seed})")
    if problems:
        raise MergeError(*problems)
    if method.random and seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        reporter.note(f"seed: {seed} (give --seed {seed} to repeat this merge bit for bit)")
    elif not method.random and seed is not None:
        reporter.warn("seed", f"--seed is ignored: {method.name} is deterministic")
        seed = None
    return Options(target, shard_size, device, seed)


def open_base(method: methods.Method, args: argparse.Namespace, models: list[Model], reporter: Reporter) -> Model | None:
    """The base model, when the method uses one; None for mergekit's karcher when the base is also listed."""
    if args.base is None or method.base in (methods.UNUSED, methods.REFUSED):
        return None
    if resolve_input(args.base, natural=False) is not None:
        raise MergeError(f"--base {args.base}: give one model, not a folder of checkpoints")
    base = open_model(args.base, args.base, reporter.warn)
    key = _identity(base)
    twin = next((m for m in models if _identity(m) == key), None)
    if twin is None:
        return base
    base.close()
    if method.base == methods.INPUT:
        return None
    raise MergeError(f"--base {args.base} is also in --models (as {twin.label}); list it only as --base")


def _identity(model: Model) -> str:
    return os.path.realpath(model.paths[0] if len(model.files) == 1 else model.folder)


def plan_merge(args: argparse.Namespace, reporter: Reporter) -> Plan:
    method = find_method(args.method)
    options = check_options(method, args, reporter)
    models, labels = open_inputs(args.models, args.sort == "natural", reporter)
    base = None
    try:
        base = open_base(method, args, models, reporter)
        return _plan_models(method, models, labels, base, options, args, reporter)
    except BaseException:
        for model in models + ([base] if base else []):
            model.close()
        raise


def count_problem(method: methods.Method, labels: list[str]) -> str | None:
    count = len(labels)
    low, high = method.min_models, method.max_models
    if low <= count and (high is None or count <= high):
        return None
    span = f"exactly {low}" if high == low else f"{low} to {high}" if high is not None else f"at least {low}"
    found = ", ".join(labels[:3]) + (", ..." if count > 3 else "")
    hint = "; use --method passthrough to copy one" if count == 1 and method.name != "passthrough" else ""
    return f"{method.name} needs {span} models, found {count} ({found}){hint}"


def _plan_models(method, models, labels, base, options, args, reporter) -> Plan:
    if base is not None and method.base == methods.INPUT:
        models, labels, base = models + [base], labels + [base.label], None
    problem = count_problem(method, labels)
    if problem:
        raise MergeError(problem)
    count = len(models)
    shared, per_model, problems = cli_settings(method, args, count)
    if problems:
        raise MergeError(*problems)
    inputs = models + ([base] if base else [])
    check_output(options.target, args.output, inputs, args.models + ([args.base] if base else []), args.overwrite)
    donor = len(inputs) - 1 if base else 0
    names = check_keys([inputs[donor]] + [m for i, m in enumerate(inputs) if i != donor], args.skip_missing, reporter)
    check_shapes(inputs, names)
    counts = layer_counts(inputs[donor].infos)
    jobs, seen_problems = [], []
    for name in names:
        infos = [m.infos[name] for m in inputs]
        if not infos[0].is_float:
            if any(info != infos[donor] for info in infos):
                reporter.warn("int-dtype", f"tensor {name}: non-float dtypes differ between models; "
                                           f"copied from {inputs[donor].label}")
            jobs.append(Job(name, infos[donor], [donor]))
            continue
        params = resolve_params(method, shared, per_model, name, layer_position(name, counts))
        for param, problem in method.problems(params):
            line = f"{method.name}: {spelled(method.param(param), args)} {problem}"
            if line not in seen_problems:
                seen_problems.append(line)
        dtypes = [info.dtype for info in infos]
        compute = args.compute_dtype or compute_dtype(method.compute_rule(params), dtypes)
        out = args.dtype or args.compute_dtype or compute_dtype(method.output, dtypes, donor)
        func, scope = method.func, method.scope
        if scope == methods.MATRIX:
            matrix = takes_matrix_path(name, infos[0])
            func, scope = (method.func, methods.WHOLE) if matrix else (method.fallback, methods.ELEMENTWISE)
        seed = tensor_seed(options.seed, name) if method.random else None
        jobs.append(Job(name, TensorInfo(out, infos[0].shape), list(range(len(inputs))), params, compute, func, scope,
                        base is not None, seed))
    if seen_problems:
        raise MergeError(*seen_problems)

    target = options.target
    by_name = {job.name: job for job in jobs}
    entries = [(job.name, job.out) for job in jobs]
    names_per_shard = plan_shards(entries, options.shard_size) if target.is_folder else [[job.name for job in jobs]]
    shards = [[(n, by_name[n].out) for n in shard] for shard in names_per_shard]
    ordered = [by_name[n] for shard in names_per_shard for n in shard]
    float_dtypes = {job.out.dtype for job in jobs if job.params is not None}
    out_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None

    copy_extra = target.is_folder if args.copy_extra_files is None else args.copy_extra_files
    extra: dict[str, str | bytes] = {}
    folder = inputs[donor].folder
    if copy_extra and folder and os.path.realpath(folder) != os.path.realpath(target.folder):
        for file_name, path in extra_files(folder, skip={target.weights_name or ""}).items():
            extra[file_name] = updated_config(path, out_dtype) if file_name == "config.json" else path
    first_params = next((job.params for job in jobs if job.params is not None), None) or resolve_params(
        method, shared, per_model, "", 0.0)
    metadata = {
        "format": "pt",
        "merge_tool": f"{TOOL} {__version__}",
        "merge_recipe": json.dumps(recipe(method, labels, base.label if base else None, shared, per_model, args,
                                          options.seed)),
        **seed_metadata(method, models, per_model, first_params),
    }
    return Plan(method, inputs, target, ordered, shards, metadata, extra, options.device, args.overwrite, args.output)


# ---------------------------------------------------------------------------------------------------
# running: a read-ahead thread feeds the main thread, which merges and writes


class ByteBudget:
    """Bounds the bytes read ahead and not yet released, so memory stays near (models + 2) tensors."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.stopped = False
        self.cond = threading.Condition()

    def acquire(self, count: int) -> bool:
        with self.cond:
            while self.used > 0 and self.used + count > self.limit and not self.stopped:
                self.cond.wait()
            self.used += count
            return not self.stopped

    def release(self, count: int) -> None:
        with self.cond:
            self.used -= count
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def job_blocks(plan: Plan, job: Job) -> list[tuple[int, int]]:
    """Element ranges read at a time: blocks for element-wise work, the whole tensor otherwise."""
    if job.params is not None and job.scope != methods.ELEMENTWISE:
        return [(0, job.out.numel)]
    return list(iter_blocks(job.out.numel, BLOCK))


class ReadAhead:
    """Reads each job's input blocks in order on a thread of its own (file reads release the GIL).

    The byte budget lets it run one block ahead of a whole job's inputs: (models + 1) blocks at most.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        largest = max((_block_bytes(plan, job, i) for job in plan.jobs for i in job.sources), default=1)
        self.budget = ByteBudget((len(plan.models) + 1) * largest)
        self.items: deque = deque()
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            for job in self.plan.jobs:
                for start, stop in job_blocks(self.plan, job):
                    for i in job.sources:
                        model = self.plan.models[i]
                        size = (stop - start) * ITEMSIZE[model.infos[job.name].dtype]
                        if not self.budget.acquire(size):
                            return
                        self._put((model.read(job.name, start, stop), size))
        except BaseException as err:  # handed to the main thread, which reports it
            self._put(err)

    def _put(self, item) -> None:
        with self.ready:
            self.items.append(item)
            self.ready.notify()

    def take(self):
        with self.ready:
            while not self.items:
                self.ready.wait()
            item = self.items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.budget.stop()
        if self.thread.is_alive():
            self.thread.join()


def _block_bytes(plan: Plan, job: Job, source: int) -> int:
    start, stop = job_blocks(plan, job)[0]
    return max(stop - start, 1) * ITEMSIZE[plan.models[source].infos[job.name].dtype]


def merge_block(plan: Plan, job: Job, inputs: list):
    """The method's output for one block of every input: output dtype for element-wise work,
    the whole tensor in the compute dtype otherwise (cast while it is written)."""
    import torch

    compute = torch_dtype(job.compute)
    device = plan.device
    keywords = dict(job.params)
    if job.seed is not None:
        keywords["generator"] = torch.Generator().manual_seed(job.seed)

    def call(tensors: list):
        if job.base:
            return job.func(tensors[:-1], base=tensors[-1], **keywords)
        return job.func(tensors, **keywords)

    if job.scope == methods.ELEMENTWISE:
        out = torch.empty(inputs[0].numel(), dtype=torch_dtype(job.out.dtype), device=device)
        step = methods.CHUNK if device == "cpu" else max(out.numel(), 1)
        for start, stop in methods.chunk_ranges(out.numel(), step):
            out[start:stop] = call([x[start:stop].to(device=device, dtype=compute) for x in inputs])
        return out
    return call([x.to(device=device, dtype=compute).reshape(job.out.shape) for x in inputs]).reshape(-1)


def run_merge(plan: Plan, reporter: Reporter) -> None:
    import torch

    torch.empty(0)  # finish importing torch here, before the read-ahead thread needs it
    started = time.monotonic()
    writer = StreamingWriter(plan.target, plan.shards, plan.metadata, plan.extra)
    total_bytes = sum(job.out.nbytes for job in plan.jobs)
    progress = _progress(total_bytes, reporter)
    reader = ReadAhead(plan)
    try:
        with OutputLock(plan.target):
            try:
                writer.open()
                reader.start()
                for job in plan.jobs:
                    _run_job(plan, job, reader, writer, reporter)
                    if progress is not None:
                        progress.update(job.out.nbytes)
                reader.stop()
                stale = writer.commit(plan.overwrite)
            except BaseException:
                reader.stop()
                writer.abort()
                raise
    finally:
        if progress is not None:
            progress.close()
        for model in plan.models:
            model.close()
    if stale:
        reporter.note(f"removed {len(stale)} weight files of the earlier output: {', '.join(stale)}")
    seconds = time.monotonic() - started
    reporter.flush()
    files = len(writer.names)
    reporter.note(f"{plan.method.name}: merged {len(plan.jobs)} tensors from {len(plan.models)} models into "
                  f"{plan.output_label} ({_size(total_bytes)}, {files} file{'s' * (files > 1)}) in {seconds:.1f} s")


def _run_job(plan: Plan, job: Job, reader: ReadAhead, writer: StreamingWriter, reporter: Reporter) -> None:
    dtype = torch_dtype(job.out.dtype)
    for _ in job_blocks(plan, job):
        items = [reader.take() for _ in job.sources]
        try:
            out = items[0][0] if job.params is None else _merge_reporting(plan, job, [t for t, _ in items], reporter)
            # A whole-tensor result is cast and copied to the host a block at a time: no second full copy.
            for start, stop in iter_blocks(out.numel(), BLOCK):
                writer.write(job.name, out[start:stop].to(device="cpu", dtype=dtype))
        finally:
            for _, size in items:
                reader.budget.release(size)


def _merge_reporting(plan: Plan, job: Job, inputs: list, reporter: Reporter):
    """merge_block, with the method's warnings and math errors reported under the tensor's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", methods.MethodWarning)
        try:
            out = merge_block(plan, job, inputs)
        except ValueError as err:
            raise MergeError(f"tensor {job.name}: {plan.method.name}: {err}") from None
    for warning in caught:
        reporter.warn(getattr(warning.message, "kind", "method"), f"tensor {job.name}: {warning.message}")
    return out


def _progress(total: int, reporter: Reporter):
    if reporter.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="merging")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count} B"


# ---------------------------------------------------------------------------------------------------
# entry point


def _return_freed_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at 4 MiB (its adaptive threshold otherwise climbs to 32 MiB).

    Tensor-sized buffers then get mappings of their own, which go back to the OS when freed, so resident
    memory follows the tensors alive (measured: 1.16 GB -> 0.89 GB peak for karcher on a 3 x 1 GB job).
    Chunk temporaries stay below it and keep reusing heap memory. Fixing the threshold also fixes the trim
    threshold at 128 KiB, which hands the heap's free top back after every freed MiB-sized chunk
    temporary and faults it in again for the next (ties on 4M elements: 119 -> 50 ns per element);
    32 MiB of free heap is kept instead.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 4 << 20)  # -3 is M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # -1 is M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    reporter = Reporter(quiet="--quiet" in arguments)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    _return_freed_buffers_to_the_os()
    try:
        args = parse_args(arguments)
        plan = plan_merge(args, reporter)
        reporter.flush()
        run_merge(plan, reporter)
    except MergeError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated; no output was written", file=sys.stderr)
        return 143
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except Exception as err:
        if "--debug" in arguments:
            traceback.print_exc()
        print(f"error: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
