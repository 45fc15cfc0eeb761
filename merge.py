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
import shutil
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field
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
    ITEMSIZE, MergeError, Model, OutputLock, OutputTarget, StreamingWriter, TensorInfo, complete_output, dtype_name,
    existing_weights, extra_files, has_glob, iter_blocks, open_model, output_target, parse_size, plan_shards,
    resolve_input, torch_dtype,
)

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")
# Elements read per model at a time for element-wise methods: one compute chunk (1 MiB of float32).
# Blocks below glibc's mmap threshold (4 MiB, set at startup) reuse freed heap memory; 16 MiB blocks
# each got a fresh mapping whose zeroed pages were faulted in again (linear on 3 x 1 GB: 5.2 s of system
# time, now 1.0 s; wall 6.2 s -> 3.8 s).
BLOCK = methods.CHUNK
WRITE_BEHIND = 16 << 20  # bytes of output that may wait for the write-behind thread
DEVICE_BLOCK = 1 << 24  # element-wise blocks for a GPU: large enough to amortise copies and kernel launches
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
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes `-1e-5` and `-inf` for flags ("expected one argument"); they are values to check.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def error(self, message: str):  # argparse's usage block would bury the one line that matters
        raise MergeError(message)


def declared_methods() -> list[methods.Method]:
    """Every declaration: the registry, then mergekit's variants of some of its names."""
    return [*methods.REGISTRY.values(), *methods.MERGEKIT_VARIANTS.values()]


def label(m: methods.Method) -> str:
    return f"{m.name} with --base" if m.mergekit_variant else m.name


def param_flags() -> dict[str, list[tuple[methods.Method, methods.Param]]]:
    """Every method-parameter flag, with the methods that declare it."""
    flags: dict[str, list] = defaultdict(list)
    for m in declared_methods():
        for p in m.params:
            flags[p.cli_flag].append((m, p))
    return dict(flags)


def _dest(flag: str) -> str:
    return "param_" + flag.lstrip("-").replace("-", "_")


def build_parser() -> Parser:
    names = "\n".join(f"  {m.name:<12} {m.summary}" for m in methods.REGISTRY.values())
    installed = os.path.basename(sys.argv[0]) == "merge-models"  # the command `pip install .` makes
    parser = Parser(
        prog="merge-models" if installed else "merge.py", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints (.safetensors, .bin, Hugging Face folders) tensor by tensor.",
        epilog=f"methods:\n{names}\n\nexit codes: 0 success, 2 bad input or environment, 130 interrupted (143 by SIGTERM), 1 internal error",
    )
    parser.add_argument("--method", metavar="NAME", help="merge method (see below)")
    parser.add_argument("--config", metavar="RECIPE", help="a mergekit YAML recipe (or an output of ours, to repeat it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe (YAML) and exit")
    parser.add_argument("--allow-unknown-keys", action="store_true", help="warn about unknown recipe keys instead of failing")
    parser.add_argument("--tokenizer-source", metavar="SOURCE",
                        help="align vocabularies: base, union or a model's path (re-indexes embeddings and heads)")
    parser.add_argument("--unsafe-truncate-embeddings", action="store_true",
                        help="merge embeddings of different vocabulary sizes over their common first rows")
    parser.add_argument("--models", nargs="+", metavar="PATH",
                        help="checkpoints: files, model folders, folders of checkpoints (sorted by name), globs")
    parser.add_argument("--base", metavar="PATH", help="base model, for methods that use one")
    parser.add_argument("--output", metavar="PATH", default="merged.safetensors",
                        help="x.safetensors (one file) or dir/ (Hugging Face folder); default merged.safetensors")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: per method, see README)")
    parser.add_argument("--compute-dtype", choices=DTYPE_CHOICES,
                        help="cast every input to this dtype as it is loaded (mergekit's dtype:)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for the math (default: 1 for streaming work, where the read and write "
                             "threads keep the cores busy; every core for SVDs)")
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
    parser.add_argument("--skip-existing", action="store_true",
                        help="do nothing (exit 0) when the output already exists and is complete")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the plan (sizes, memory, disk, time); write nothing")
    parser.add_argument("--json", action="store_true", help="print a JSON summary of the run on stdout")
    parser.add_argument("--jobs", metavar="FILE",
                        help="run one merge per line of FILE (its flags, then these); report each, go on after failures")
    parser.add_argument("--strict", action="store_true",
                        help="NaN or Inf in a merged tensor is an error (default: a warning naming the tensor)")
    parser.add_argument("--quiet", action="store_true", help="no progress, input order or summary; warnings stay")
    parser.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    parser.add_argument("--version", action="version", version=f"{TOOL} {__version__}")
    group = parser.add_argument_group("method parameters (each used only by the methods named)")
    for flag, users in param_flags().items():
        p = users[0][1]
        texts: dict[str, list[str]] = defaultdict(list)  # methods sharing a parameter's text are named once
        for m, q in users:
            limits = f", {q.range_text()}" if q.range_text() else ""
            texts[f"{q.help} (default {q.default_text}{limits})"].append(label(m))
        helps = "; ".join(f"{', '.join(names)}: {text}" for text, names in texts.items())
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
    return args


def methods_table() -> str:
    """The README's methods table, generated from the registry (a test keeps the README in step)."""
    rules = {methods.FLOAT32: "float32", methods.FIRST: "first model's", methods.PROMOTED: "inputs' (promoted)",
             methods.BASE: "base's"}
    rows = ["| method | what it does | when to use it | models | base | parameters (CLI flag = default) "
            "| computes in | writes | scope |", "|---|---|---|---|---|---|---|---|---|"]
    for m in declared_methods():
        count = (f"{m.min_models}" if m.max_models == m.min_models else
                 f"{m.min_models}–{m.max_models}" if m.max_models else f"≥ {m.min_models}")
        params = "<br>".join(f"`{p.cli_flag}` = {p.default_text}" + (" (per model)" if p.per_model else "")
                             for p in m.params) or "—"
        compute = m.compute.__doc__ if callable(m.compute) else rules.get(m.compute, m.compute)
        rows.append(f"| `{label(m)}` | {m.summary} | {m.when} | {count} | {m.base} | {params} | {compute} "
                    f"| {rules.get(m.output, m.output)} | {m.scope} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------
# parameter settings: a scalar, a per-layer gradient (a list) or a list of {filter, value} entries


UNSET = object()


def evaluate(setting, name: str, t: float):
    """The value a setting takes for tensor `name` at layer position t in [0, 1] (mergekit's rules)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or (name and pattern in name):
                return evaluate(entry["value"], name, t)
        return UNSET
    if isinstance(setting, list):
        if not setting:
            return UNSET
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
PRE_LAYER = re.compile(r"embed|wte|wpe|tok_embeddings")  # mergekit's "pre-layer" weights; all other non-layer are post


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
# recipes: what to merge, from the flags or from a mergekit YAML file, in one shape


@dataclass
class Source:
    """One model's place in a merge: the path as written, its own settings, its layers within a slice."""

    path: str
    settings: dict = field(default_factory=dict)
    layers: tuple[int, int] | None = None


@dataclass
class Slice:
    sources: list[Source]
    settings: dict = field(default_factory=dict)
    base: str | None = None


@dataclass
class Recipe:
    method: methods.Method
    slices: list[Slice]  # the `models:` form is one slice whose sources have no layer ranges
    base: str | None = None
    settings: dict = field(default_factory=dict)  # the top-level `parameters:`
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    sliced: bool = False  # written with `slices:`: output layers are renumbered
    from_config: bool = False  # messages name recipe keys rather than flags
    tokenizer: dict | None = None  # {source: base | union | PATH, tokens?, pad_to_multiple_of?}


RECIPE_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "seed",
               "tokenizer_source", "tokenizer"}
UNSUPPORTED_KEYS = {
    "modules": "use models: or slices:",
    "chat_template": "copy the chat template into tokenizer_config.json yourself",
}


def load_config(path: str) -> dict:
    """A mergekit YAML recipe, or the recipe stored in an output of ours (a .safetensors file or folder)."""
    import yaml

    weights = path if path.endswith(".safetensors") else None
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        weights = os.path.join(path, found[0]) if found else None
        if weights is None:
            raise MergeError(f"--config {path}: this folder holds no output of {TOOL} to repeat")
    if weights:
        from io_utils import SafetensorsFile

        f = SafetensorsFile(weights)
        f.close()
        if "merge_recipe" not in f.metadata:
            raise MergeError(f"--config {path}: this file holds no merge recipe")
        return json.loads(f.metadata["merge_recipe"])
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise MergeError(f"--config {path}: no such file") from None
    except OSError as err:
        raise MergeError(f"--config {path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise MergeError(f"--config {path}: not valid YAML{line} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise MergeError(f"--config {path}: a recipe is a YAML mapping with merge_method and models or slices")
    return data


def check_model_reference(text, where: str) -> list[str]:
    if not isinstance(text, str) or not text:
        return [f"{where}: a model is a path (got {text!r})"]
    if "@" in text or "+" in text:
        return [f"{where}: {text}: revisions (@) and LoRA adapters (+) are not supported; give a local folder"]
    if not os.path.exists(text) and not has_glob(text) and re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return [f"{where}: {text}: not found here; {TOOL} never downloads, so give the path of a local copy"]
    return []


def recipe_method(data: dict) -> methods.Method:
    """A recipe's method: mergekit's semantics of the name (karcher), unless the recipe sets a shared
    parameter that only our semantics have (our outputs store karcher's `compute`)."""
    method = find_method(data["merge_method"])
    variant = methods.MERGEKIT_VARIANTS.get(method.name)
    if variant is None:
        return method
    ours = {p.key for p in method.params if not p.per_model} - {p.key for p in variant.params}
    levels = [data.get("parameters")] + [s.get("parameters") for s in data.get("slices") or [] if isinstance(s, dict)]
    given = {key for level in levels if isinstance(level, dict) for key in level}
    return method if given & ours else variant


def config_settings(method: methods.Method, raw, where: str, level: str, reporter: Reporter) -> tuple[dict, list[str]]:
    """A `parameters:` mapping, checked: known names, per-model names at model level, well-formed values."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [f"{where}: parameters must be a mapping of names to values"]
    settings, problems = {}, []
    by_key = {p.key: p for p in method.params}
    for key, value in raw.items():
        p = by_key.get(key)
        if p is None and key in method.ignores:
            reporter.warn("ignored-parameter", f"{where}: {key} is ignored: {method.ignores[key]}")
            continue
        if p is None:
            known = ", ".join(sorted(by_key)) or "none"
            note = "; mergekit removed embed_slerp in 2024 (PR #334)" if key == "embed_slerp" else ""
            guess = methods.closest_names(str(key), list(by_key))
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            problems.append(f"{where}: unknown parameter {key}{hint}: {method.name} takes {known}{note}")
            continue
        if level == "model" and not p.per_model:
            problems.append(f"{where}: {key} is shared by all models; move it to parameters:")
            continue
        value, problem = normalised_setting(p, value)
        if problem:
            problems.append(f"{where}: {key}: {problem}")
            continue
        settings[p.name] = value
    return settings, problems


def normalised_setting(p: methods.Param, setting):
    """The setting with each scalar coerced to the parameter's type ('1e-5' is a number, as mergekit reads
    it), or a problem."""

    def scalar(value):
        if isinstance(value, (list, dict)):
            raise ValueError(f"unexpected {type(value).__name__} where a value belongs")
        if p.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false (got {value!r})")
            return value
        if p.kind is str:
            return str(value)
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number (got {value!r})") from None
        return int(number) if p.kind is int and number == int(number) else number

    def walk(value, top: bool):
        if isinstance(value, dict):
            if not top or "value" not in value or set(value) - {"filter", "value"}:
                raise ValueError("a conditional entry is {filter: text, value: setting}")
            if value.get("filter") is not None and not isinstance(value["filter"], str):
                raise ValueError("a filter is text")
            return {**value, "value": walk(value["value"], False)}
        if isinstance(value, list):
            if top and value and all(isinstance(e, dict) for e in value):
                return [walk(e, True) for e in value]
            return [scalar(e) for e in value]
        return scalar(value)

    try:
        return walk(setting, True), None
    except ValueError as err:
        return None, str(err)


def recipe_from_config(data: dict, args: argparse.Namespace, reporter: Reporter) -> Recipe:
    """A mergekit YAML recipe as given: every key checked, all problems reported together."""
    problems = []
    unknown = [k for k in data if k not in RECIPE_KEYS]
    for key in unknown:
        reason = UNSUPPORTED_KEYS.get(key)
        if reason:
            problems.append(f"recipe key {key} is not supported: {reason}")
        elif args.allow_unknown_keys:
            reporter.warn("recipe-key", f"recipe key {key} is not used by {TOOL}; ignored")
        else:
            problems.append(f"unknown recipe key {key} (--allow-unknown-keys ignores it)")
    if not isinstance(data.get("merge_method"), str):
        raise MergeError(*problems, "the recipe needs merge_method: NAME")
    method = recipe_method(data)
    if ("models" in data) == ("slices" in data):
        problems.append("the recipe needs exactly one of models: and slices:")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPE_CHOICES:
            problems.append(f"{key}: {data[key]!r} is not one of {', '.join(DTYPE_CHOICES)}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problems.append(f"seed must be an integer (got {seed!r})")
    base = data.get("base_model")
    if base is not None:
        problems += check_model_reference(base, "base_model")
    settings, found = config_settings(method, data.get("parameters"), "parameters", "top", reporter)
    problems += found
    slices = []
    if isinstance(data.get("models"), list) and data["models"]:
        sources, found = config_sources(method, data["models"], "models", False, reporter)
        problems += found
        slices.append(Slice(sources))
    elif "models" in data:
        problems.append("models: must be a list of {model: PATH, parameters: {...}}")
    if isinstance(data.get("slices"), list) and data["slices"]:
        for i, entry in enumerate(data["slices"]):
            where = f"slices[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
                problems.append(f"{where}: a slice is {{sources: [{{model, layer_range}}, ...]}}")
                continue
            for key in set(entry) - {"sources", "base_model", "parameters", "residual_weight"}:
                problems.append(f"{where}: unknown key {key}")
            if "residual_weight" in entry:
                reporter.warn("residual", f"{where}: residual_weight is ignored (mergekit does not use it either)")
            slice_settings, found = config_settings(method, entry.get("parameters"), f"{where}.parameters", "slice", reporter)
            problems += found
            sources, found = config_sources(method, entry["sources"], f"{where}.sources", True, reporter)
            problems += found
            if entry.get("base_model") is not None:
                problems += check_model_reference(entry["base_model"], f"{where}.base_model")
            slices.append(Slice(sources, slice_settings, entry.get("base_model")))
    elif "slices" in data:
        problems.append("slices: must be a list of slices")
    tokenizer = None
    try:
        tokenizer = tokenizer_setting(data)
    except MergeError as err:
        problems.extend(err.lines)
    if problems:
        raise MergeError(*problems)
    return Recipe(method, slices, base, settings, data.get("dtype"), data.get("out_dtype"), seed,
                  sliced="slices" in data, from_config=True, tokenizer=tokenizer)


def config_sources(method: methods.Method, entries: list, where: str, with_layers: bool,
                   reporter: Reporter) -> tuple[list[Source], list[str]]:
    sources, problems = [], []
    for i, entry in enumerate(entries):
        source, found = config_source(method, entry, f"{where}[{i}]", with_layers, reporter)
        problems += found
        if source:
            sources.append(source)
    return sources, problems


def config_source(method: methods.Method, entry, where: str, with_layers: bool,
                  reporter: Reporter) -> tuple[Source | None, list[str]]:
    keys = {"model", "parameters"} | ({"layer_range"} if with_layers else set())
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        return None, [f"{where}: needs model: PATH"]
    problems = [f"{where}: unknown key {k}" for k in entry if k not in keys]
    problems += check_model_reference(entry["model"], where)
    settings, found = config_settings(method, entry.get("parameters"), f"{where} ({entry['model']})", "model", reporter)
    problems += found
    layers = None
    if with_layers:
        span = entry.get("layer_range")
        if (not isinstance(span, list) or len(span) != 2 or not all(type(n) is int for n in span)
                or not 0 <= span[0] < span[1]):
            problems.append(f"{where}: layer_range must be [start, end) with 0 <= start < end (got {span!r})")
        else:
            layers = (span[0], span[1])
    return Source(entry["model"], settings, layers), problems


def recipe_from_args(method: methods.Method, args: argparse.Namespace, reporter: Reporter) -> Recipe:
    """The recipe the flags describe: folders of checkpoints and globs expand into their files here.

    A --base selects mergekit's semantics of a name that has them (karcher).
    """
    if args.base is not None:
        method = methods.MERGEKIT_VARIANTS.get(method.name, method)
    paths = expand_inputs(args.models, args.sort == "natural", reporter)
    base = args.base if method.base not in (methods.UNUSED, methods.REFUSED) else None
    if base is not None and resolve_input(base, natural=False) is not None:
        raise MergeError(f"--base {base}: give one model, not a folder of checkpoints")
    recipe = Recipe(method, [Slice([Source(p) for p in paths])], base, dtype=args.compute_dtype,
                    out_dtype=args.dtype, seed=args.seed,
                    tokenizer={"source": args.tokenizer_source} if args.tokenizer_source else None)
    apply_flags(recipe, args)
    return recipe


def expand_inputs(paths: Sequence[str], natural: bool, reporter: Reporter) -> list[str]:
    """Every model path the arguments stand for, in merge order; the order of an expansion is printed."""
    problems, found = [], []
    for path in paths:
        try:
            expanded = resolve_input(path, natural)
        except MergeError as err:
            problems.extend(err.lines)
            continue
        if expanded is None:
            found.append(path)
            continue
        if not expanded:
            problems.append(f"{path}: no checkpoints in this folder")
            continue
        found.extend(expanded)
        names = [os.path.basename(p.rstrip("/")) for p in expanded]
        widths = {len(n) for part in names for n in re.findall(r"\d+", part)}
        if not natural and len(widths) > 1:
            reporter.warn("order", f"{path}: checkpoint names hold numbers of different widths, so code-point "
                                   f"order may not be training order; --sort natural orders them by number")
        reporter.note(f"{path}: {len(expanded)} checkpoints, in this order: " + ", ".join(names))
    if problems:
        raise MergeError(*problems)
    return found


def apply_flags(recipe: Recipe, args: argparse.Namespace) -> None:
    """Parameter flags: on the plain CLI they make the settings; with --config each one replaces every
    setting of its parameter in the recipe (all levels and filters)."""
    method = recipe.method
    problems = []
    models = [s for piece in recipe.slices for s in piece.sources]
    count = len(recipe.slices[0].sources) if not recipe.sliced else 1
    for p in method.params:
        raw = getattr(args, _dest(p.cli_flag))
        if raw is None:
            continue
        if p.kind in (bool, str):
            values = [raw]
        else:
            flag = spelled(p, args)
            texts = split_values(raw)
            if not texts:
                continue
            try:
                values = [parse_number(v, flag, method.name, p.kind) for v in texts]
            except MergeError as err:
                problems.extend(err.lines)
                continue
        recipe.settings.pop(p.name, None)
        for piece in recipe.slices:
            piece.settings.pop(p.name, None)
        for source in models:
            source.settings.pop(p.name, None)
        if not p.per_model:
            recipe.settings[p.name] = values[0] if len(values) == 1 else values
        elif len(values) == 1:
            for source in models:
                source.settings[p.name] = values[0]
        elif len(values) == count:
            for source, value in zip(recipe.slices[0].sources, values):
                source.settings[p.name] = value
        else:
            where = "models" if not recipe.sliced else "models (one value for all with slices:)"
            problems.append(f"{method.name}: {spelled(p, args)} has {len(values)} values for {count} {where}")
    if problems:
        raise MergeError(*problems)


def range_problems(recipe: Recipe, args: argparse.Namespace) -> list[str]:
    """Every value in every setting checked against its parameter's declared range."""
    method = recipe.method
    problems = []

    def check(p: methods.Param, setting, where: str) -> None:
        name = p.key if recipe.from_config else spelled(p, args)
        for value in scalars(setting):
            problem = p.problem(value)
            line = f"{method.name}: {name} {problem}{where}"
            if problem and line not in problems:
                problems.append(line)

    for p in method.params:
        if p.name in recipe.settings:
            check(p, recipe.settings[p.name], "")
        for piece in recipe.slices:
            if p.name in piece.settings:
                check(p, piece.settings[p.name], "")
            for i, source in enumerate(piece.sources):
                if p.name in source.settings:
                    multiple = len(piece.sources) > 1 and not recipe.from_config
                    where = f" for model {i + 1}" if multiple else f" (model {source.path})" if recipe.from_config else ""
                    check(p, source.settings[p.name], where)
    return problems


# ---------------------------------------------------------------------------------------------------
# vocabularies: tokenizer_source re-indexes the token rows of embeddings and heads to one tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model")


@dataclass
class Alignment:
    """How one vocabulary tensor's inputs are re-indexed before the method sees them."""

    index: list  # per read: the model's row for each output token, or -1
    fallback: list  # per output token: a read's position, MEAN_OF_HOLDERS or ZEROS
    fallback_rows: list  # the row of that read
    forced: list  # per output token: every model takes the fallback row
    rows: int  # output rows, padding included
    axis: int  # the token axis of the tensor


@dataclass
class Vocabulary:
    tokens: dict[str, int]  # output token -> id
    ids: list[dict[str, int]]  # per opened model: token -> its row (only rows below its vocab_size)
    rows: int
    overrides: dict  # token -> its `tokens:` setting
    files: dict[str, bytes | str]  # the output's tokenizer files
    base: int | None  # the opened model whose rows win a tie (the base, when it is merged)


def tokenizer_setting(data: dict) -> dict | None:
    """`tokenizer_source: X` or `tokenizer: {source, tokens, pad_to_multiple_of}` as one mapping."""
    if "tokenizer_source" in data and "tokenizer" in data:
        raise MergeError("give tokenizer_source: or tokenizer:, not both")
    if data.get("tokenizer_source") is not None:
        return {"source": data["tokenizer_source"]}
    block = data.get("tokenizer")
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise MergeError("tokenizer: takes source, tokens and pad_to_multiple_of")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergeError(f"tokenizer: pad_to_multiple_of must be a positive integer (got {pad!r})")
    if not isinstance(block.get("tokens") or {}, dict):
        raise MergeError("tokenizer: tokens must map token strings to {source, force}")
    return {"source": block.get("source", "union"), **{k: v for k, v in block.items() if k != "source"}}


def read_tokenizer(model: Model) -> dict | None:
    """A model's tokenizer.json, parsed; None when it has none (then it is taken to share the base's)."""
    folder = model.folder
    path = os.path.join(folder, "tokenizer.json") if folder else ""
    if folder and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
            token_ids(document)
            return document
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise MergeError(f"{path}: not a readable tokenizer.json ({err})") from None
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise MergeError(f"{model.label}: its tokenizer is only a sentencepiece tokenizer.model; aligning vocabularies "
                         "needs tokenizer.json (save the tokenizer with transformers' fast tokenizer first)")
    return None


def token_ids(document: dict) -> dict[str, int]:
    """Every token of a tokenizer.json with its id: the model's vocabulary and the added tokens."""
    vocab = document.get("model", {}).get("vocab", {})
    ids = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab)}
    for added in document.get("added_tokens", []):
        ids[added["content"]] = added["id"]
    return ids


def model_vocab_size(model: Model, ids: dict[str, int]) -> int:
    size = read_config(model.folder).get("vocab_size")
    if isinstance(size, int):
        return size
    rows = [info.shape[0] for name, info in model.infos.items() if EMBEDDING.search(name) and info.shape]
    return rows[0] if rows else len(ids)


def stripped_tokenizer(document: dict, size: int, label: str) -> dict:
    """The tokenizer without ids >= the model's vocab_size (padding entries nobody can embed); BPE only."""
    unused = {token for token, i in token_ids(document).items() if i >= size}
    if not unused:
        return document
    if document.get("model", {}).get("type") != "BPE":
        raise MergeError(f"{label}: its tokenizer has ids past vocab_size {size}, and only BPE tokenizers can be "
                         "stripped of them")
    result = json.loads(json.dumps(document))
    result["added_tokens"] = [e for e in result.get("added_tokens", []) if e["id"] < size]
    vocab = result["model"]["vocab"]
    for token in unused:
        vocab.pop(token, None)

    def keeps(merge_rule) -> bool:
        parts = merge_rule.split(" ") if isinstance(merge_rule, str) else merge_rule
        return not any(part in unused for part in parts)

    result["model"]["merges"] = [m for m in result["model"].get("merges", []) if keeps(m)]
    return result


def added_entry(token: str, token_id: int, settings: dict | None = None) -> dict:
    """An added_tokens entry as transformers' add_tokens writes it for a plain (non-special) token."""
    entry = {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": True, "special": False}
    if settings:
        entry.update({k: v for k, v in settings.items() if k in entry and k != "id"})
    return entry


def plan_vocabulary(recipe: Recipe, models: list[Model], groups: list[Group], reporter: Reporter) -> Vocabulary | None:
    """The output vocabulary, each model's token ids, and the output's tokenizer files."""
    setting = recipe.tokenizer
    if setting is None:
        return None
    source = setting["source"]
    first = groups[0]
    base_position = first.sources[-1] if first.base or recipe.base else first.sources[0]
    if recipe.base:
        base_position = next((p for g in groups for p in g.sources if models[p].label == recipe.base), base_position)
    base_model = models[base_position]
    documents = [read_tokenizer(m) for m in models]
    base_document = documents[base_position]
    if base_document is None:
        raise MergeError(f"{base_model.label}: no tokenizer.json, so its vocabulary cannot be aligned")
    sizes = []
    for model, document in zip(models, documents):
        if document is None:
            reporter.warn("tokenizer", f"{model.label} has no tokenizer.json: taken to share {base_model.label}'s")
        sizes.append(model_vocab_size(model, token_ids(document or base_document)))
    base_stripped = stripped_tokenizer(base_document, sizes[base_position], base_model.label)
    files: dict[str, bytes | str] = {}
    if source == "base":
        out_document = base_stripped
        files_from = base_model.folder
    elif source == "union":
        out_document = union_tokenizer(base_stripped, documents, sizes, base_position)
        files_from = base_model.folder
    else:
        chosen = next((i for i, m in enumerate(models) if m.label == source or _same_path(m, source)), None)
        if chosen is None:
            raise MergeError(f"tokenizer_source {source}: not one of the merged models (give base, union or a model's path)")
        out_document, files_from = documents[chosen], models[chosen].folder
        if out_document is None:
            raise MergeError(f"tokenizer_source {source}: that model has no tokenizer.json")
    overrides = setting.get("tokens") or {}
    tokens = token_ids(out_document)
    for token in overrides:
        if token not in tokens:
            out_document = json.loads(json.dumps(out_document))
            tokens[token] = len(tokens)
            out_document.setdefault("added_tokens", []).append(added_entry(token, tokens[token]))
    ids = [{t: i for t, i in token_ids(d or base_document).items() if i < size} for d, size in zip(documents, sizes)]
    rows = len(tokens)
    pad = setting.get("pad_to_multiple_of")
    if pad and rows % pad:
        rows += pad - rows % pad
    for name in TOKENIZER_FILES:
        path = os.path.join(files_from, name) if files_from else ""
        if path and os.path.isfile(path):
            files[name] = path
    original = documents[next(i for i, m in enumerate(models) if m.folder == files_from)] if files_from else None
    if original is None or token_ids(out_document) != token_ids(original):
        files["tokenizer.json"] = (json.dumps(out_document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        files.update(tokenizer_side_files(files_from, out_document))
    return Vocabulary(tokens, ids, rows, overrides, files, base_position if first.base or recipe.base else None)


def warn_on_different_tokenizers(models: list[Model], reporter: Reporter) -> None:
    """Same-sized vocabularies can still map ids to different tokens: say so, since that merge is garbage."""
    seen = None
    for model in models:
        try:
            document = read_tokenizer(model)
        except MergeError:
            continue
        if document is None:
            continue
        ids = token_ids(document)
        if seen is not None and ids != seen[1]:
            reporter.warn("tokenizers", f"{model.label} and {seen[0]} have different tokenizers; "
                                        "--tokenizer-source union (or base) aligns their embeddings")
            return
        seen = seen or (model.label, ids)


def _same_path(model: Model, path: str) -> bool:
    return os.path.exists(path) and os.path.realpath(path) == _identity(model)


def union_tokenizer(base: dict, documents: list, sizes: list[int], base_position: int) -> dict:
    """The base vocabulary, then each model's other tokens (below its vocab_size), then added tokens (first
    definition wins): new tokens become added tokens of the base tokenizer, as transformers' add_tokens does."""
    result = json.loads(json.dumps(base))
    known = token_ids(result)
    next_id = max(known.values(), default=-1) + 1
    order = [base_position] + [i for i in range(len(documents)) if i != base_position]
    plain, added = [], {}
    for i in order:
        document = documents[i]
        if document is None:
            continue
        specials = {e["content"]: e for e in document.get("added_tokens", [])}
        for token, token_id in sorted(token_ids(document).items(), key=lambda item: item[1]):
            if token_id >= sizes[i]:
                continue
            if token in specials:
                added.setdefault(token, specials[token])
            elif token not in known and token not in plain:
                plain.append(token)
    for token in plain:
        if token not in added:
            result.setdefault("added_tokens", []).append(added_entry(token, next_id))
            known[token] = next_id
            next_id += 1
    for token, entry in added.items():
        if token not in known:
            result.setdefault("added_tokens", []).append(added_entry(token, next_id, entry))
            known[token] = next_id
            next_id += 1
    return result


def tokenizer_side_files(folder: str | None, document: dict) -> dict[str, bytes]:
    """tokenizer_config.json's added_tokens_decoder and added_tokens.json made to match tokenizer.json."""
    files = {}
    entries = {e["id"]: e for e in document.get("added_tokens", [])}
    config_path = os.path.join(folder, "tokenizer_config.json") if folder else ""
    if config_path and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        if isinstance(config, dict):
            config["added_tokens_decoder"] = {
                str(i): {k: v for k, v in e.items() if k != "id"} for i, e in sorted(entries.items())}
            files["tokenizer_config.json"] = (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    added_path = os.path.join(folder, "added_tokens.json") if folder else ""
    if added_path and os.path.isfile(added_path):
        files["added_tokens.json"] = (json.dumps({e["content"]: i for i, e in sorted(entries.items())},
                                                 ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    return files


def vocabulary_alignment(vocabulary: Vocabulary, models: list[Model], tensor: OutputTensor, axis: int,
                         reporter: Reporter) -> Alignment:
    """Row maps and fallback rows of one vocabulary tensor, by mergekit's rules."""
    positions = tensor.group.sources
    rows_held = [models[p].infos[n].shape[axis] for p, n in zip(positions, tensor.reads)]
    index = [[-1] * len(vocabulary.tokens) for _ in positions]
    for r, (token, _) in enumerate(sorted(vocabulary.tokens.items(), key=lambda item: item[1])):
        for j, p in enumerate(positions):
            row = vocabulary.ids[p].get(token, -1)
            index[j][r] = row if row < rows_held[j] else -1
    order = sorted(vocabulary.tokens.items(), key=lambda item: item[1])
    fallback, fallback_rows, forced, missing = [], [], [], []
    for r, (token, _) in enumerate(order):
        holders = [j for j in range(len(positions)) if index[j][r] >= 0]
        setting = vocabulary.overrides.get(token)
        forced.append(bool(setting and setting.get("force")))
        source = override_source(setting, models, positions, vocabulary) if setting else None
        if source is not None:
            fallback.append(source[0])
            fallback_rows.append(source[1] if source[1] is not None else max(index[source[0]][r], 0))
        elif len(holders) == 1:
            fallback.append(holders[0])
            fallback_rows.append(index[holders[0]][r])
        elif not holders:
            missing.append(token)
            fallback.append(methods.ZEROS)
            fallback_rows.append(0)
        elif vocabulary.base is not None and vocabulary.base in positions and \
                index[positions.index(vocabulary.base)][r] >= 0:
            j = positions.index(vocabulary.base)
            fallback.append(j)
            fallback_rows.append(index[j][r])
        else:
            fallback.append(methods.MEAN_OF_HOLDERS)
            fallback_rows.append(0)
    if missing:
        reporter.warn("token-zero", f"tensor {tensor.name}: {len(missing)} tokens are in no model "
                                    f"({', '.join(map(repr, missing[:3]))}); their rows are zeros")
    return Alignment(index, fallback, fallback_rows, forced, vocabulary.rows, axis)


def override_source(setting: dict, models: list[Model], positions: list[int], vocabulary: Vocabulary):
    """A `tokens:` entry's row source: (read position or ZEROS, row or None for the same token's row)."""
    source = setting.get("source")
    if isinstance(source, dict) and source.get("kind") == "zero":
        return methods.ZEROS, 0
    model = source.get("model") if isinstance(source, dict) else source
    matches = [j for j, p in enumerate(positions) if models[p].label == model or _same_path(models[p], str(model))]
    if not matches:
        raise MergeError(f"tokenizer tokens: {model} is not one of the merged models")
    j = matches[0]
    if isinstance(source, dict) and source.get("kind") == "model_token":
        if "token_id" in source:
            return j, int(source["token_id"])
        row = vocabulary.ids[positions[j]].get(source.get("token"))
        if row is None:
            raise MergeError(f"tokenizer tokens: token {source.get('token')!r} is not in {model}'s vocabulary")
        return j, row
    return j, None


# ---------------------------------------------------------------------------------------------------
# planning: models opened (headers only), every output tensor decided, every check done


@dataclass
class Job:
    """One output tensor: where its inputs come from and how it is made."""

    name: str
    out: TensorInfo  # dtype and shape written
    reads: list[tuple[int, str]]  # (index into Plan.models, tensor name there); with `base`, the base is last
    params: dict | None = None  # resolved method parameters; None copies reads[0] through unchanged
    compute: str | None = None  # compute dtype name
    func: Callable | None = None  # the method's function, or its element-wise fallback
    scope: str = methods.ELEMENTWISE  # how `func` is fed: chunks, or whole tensors
    base: bool = False  # pass the last input as `base=`
    seed: int | None = None  # the seed of this tensor's generator, for random methods
    align: Alignment | None = None  # vocabulary tensors: the inputs' rows re-indexed first
    load: str | None = None  # the dtype every input is cast to as it is loaded (recipe `dtype:`)


@dataclass
class Plan:
    method: methods.Method
    models: list[Model]  # every model opened once
    target: OutputTarget
    jobs: list[Job]
    shards: list[list[tuple[str, TensorInfo]]]
    metadata: dict[str, str]
    extra: dict[str, str | bytes]
    device: str
    overwrite: bool
    output_label: str
    recipe: dict  # the resolved recipe, as stored in the output
    threads: int | None = None  # --threads


@dataclass
class Group:
    """The models merged together for some output tensors: one per slice (one in all without slices)."""

    sources: list[int]  # indices into the opened models, in merge order; the base last when `base`
    settings: list[dict]  # each source's own settings
    slice_settings: dict
    layers: list[tuple[int, int] | None]
    base: bool
    donor: int  # position in sources of the model that gives non-float tensors and extra files


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
    default_semantics = {p.cli_flag: p for p in methods.REGISTRY[method.name].params}
    for flag, users in param_flags().items():
        value = getattr(args, _dest(flag))
        if value is None or flag in declared or (isinstance(value, list) and not split_values(value)):
            continue
        p = users[0][1]
        if flag in default_semantics:  # mergekit's variant, chosen by --base, lacks this flag
            own = default_semantics[flag]
            hint = " (list the base in --models to give it a weight)" if own.per_model else ""
            problems.append(f"{method.name}: {spelled(own, args)} cannot be combined with --base{hint}")
            continue
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


def open_models(recipe: Recipe, reporter: Reporter) -> tuple[list[Model], dict[str, int]]:
    """Every model of the recipe opened once (headers only); all failures reported together."""
    paths = [s.path for piece in recipe.slices for s in piece.sources]
    paths += [p for p in [recipe.base] + [piece.base for piece in recipe.slices] if p]
    models, index, problems = [], {}, []
    for path in paths:
        if path in index:
            continue
        try:
            model = open_model(path, path, reporter.warn)
        except MergeError as err:
            problems.extend(err.lines)
            index[path] = -1
            continue
        twin = next((i for i, m in enumerate(models) if _identity(m) == _identity(model)), None)
        if twin is not None:
            model.close()
            index[path] = twin
            continue
        index[path] = len(models)
        models.append(model)
    if problems:
        for model in models:
            model.close()
        raise MergeError(*problems)
    return models, index


def _identity(model: Model) -> str:
    return os.path.realpath(model.paths[0] if len(model.files) == 1 else model.folder)


def build_groups(recipe: Recipe, models: list[Model], index: dict[str, int], args: argparse.Namespace,
                 reporter: Reporter) -> list[Group]:
    """Each slice's models in merge order, with the base placed as the method's base policy says."""
    method = recipe.method
    groups, problems = [], []
    for number, piece in enumerate(recipe.slices):
        where = f"slices[{number}]: " if recipe.sliced else ""
        sources = list(piece.sources)
        positions = [index[s.path] for s in sources]
        if not recipe.sliced:
            seen: dict[int, str] = {}
            for source, position in zip(sources, positions):
                if position in seen:
                    problems.append(f"{source.path}: the same model is given twice (also as {seen[position]})")
                seen.setdefault(position, source.path)
        base_path = piece.base or recipe.base
        base_at = None
        if base_path is not None and method.base != methods.REFUSED:
            base_position = index[base_path]
            listed = [i for i, p in enumerate(positions) if p == base_position]
            if listed:
                base_at = listed[0]
            elif recipe.sliced:
                problems.append(f"{where}base_model {base_path} is not one of the slice's sources")
                continue
            elif method.base == methods.UNUSED and not recipe.from_config:
                pass  # the flag was warned about and ignored
            else:
                if method.base == methods.UNUSED:
                    reporter.warn("base-input", f"base_model {base_path} is merged as one more input, as mergekit "
                                                f"does: {method.name} does not use a base")
                sources.append(Source(base_path))
                positions.append(base_position)
                base_at = len(sources) - 1
        elif base_path is not None:
            problems.append(f"{method.name} takes no base model")
        uses_base = method.uses_base and base_at is not None
        if uses_base:
            ignored = [p.key for p in method.params if p.per_model and p.name in sources[base_at].settings]
            if ignored:
                reporter.warn("base-params", f"{', '.join(ignored)} given for the base model {base_path} "
                                             "is ignored (the base is not merged with a weight)")
            sources.append(sources.pop(base_at))
            positions.append(positions.pop(base_at))
        elif method.base == methods.REQUIRED:
            problems.append(f"{where}{method.name} needs a base model: give it with --base PATH (base_model: in a recipe)")
            continue
        labels = [s.path for s in sources[:-1]] if uses_base else [s.path for s in sources]
        problem = count_problem(method, labels)
        if problem:
            problems.append(where + problem)
            continue
        group = Group(positions, [s.settings for s in sources], piece.settings, [s.layers for s in sources],
                      uses_base, 0)
        settings, _ = resolve_params(recipe, group, OutputTensor("", group, [""] * len(sources), 0.0))
        found = checked(recipe, settings, len(labels), args, reporter)
        if found:
            problems.extend(where + line for line in found if where + line not in problems)
            continue
        if uses_base or (base_at is not None and method.base == methods.INPUT):
            group.donor = len(sources) - 1
        elif method.donor:
            group.donor = int(settings[method.donor]) - 1
        groups.append(group)
    if problems:
        raise MergeError(*problems)
    return groups


def checked(recipe: Recipe, params: dict, count: int, args: argparse.Namespace, reporter: Reporter) -> list[str]:
    """The method's cross-parameter problems as error lines; each warning its check gives is reported once."""
    method = recipe.method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", methods.MethodWarning)
        found = method.problems(params, count)
    for warning in caught:
        kind, message = getattr(warning.message, "kind", "method"), f"{method.name}: {warning.message}"
        if message not in reporter.warnings.get(kind, []):  # the same check runs for every tensor
            reporter.warn(kind, message)
    return [f"{method.name}: {p.key if recipe.from_config else spelled(p, args)} {problem}"
            for p, problem in ((method.param(name), problem) for name, problem in found)]


def count_problem(method: methods.Method, labels: list[str]) -> str | None:
    count = len(labels)
    low, high = method.min_models, method.max_models
    if low <= count and (high is None or count <= high):
        return None
    span = f"exactly {low}" if high == low else f"{low} to {high}" if high is not None else f"at least {low}"
    found = ", ".join(labels[:3]) + (", ..." if count > 3 else "")
    hint = ("; use --method passthrough to copy one" if count == 1 and method.name != "passthrough"
            else f"; {method.too_few_hint}" if count < low and method.too_few_hint else "")
    return f"{method.name} needs {span} models, found {count} ({found}){hint}"


HEADS = {"lm_head.weight", "embed_out.weight"}
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")


def group_names(models: list[Model], skip_missing: bool, reporter: Reporter) -> dict[str, list[str]]:
    """Output name -> the name read from each model, in the first model's storage order.

    Missing tensors are an error unless skipped. A tied model that lacks the output head contributes its
    input embedding there (mergekit's fallback); when no model has a head, none is written.
    """
    order = models[0].storage_order()
    union = set().union(*(m.infos for m in models))
    stand_ins = {}
    for head in HEADS & union:
        for m in models:
            if head not in m.infos:
                embedding = next((n for n in m.infos if EMBEDDING.search(n)), None)
                if embedding is not None:
                    stand_ins[(id(m), head)] = embedding
    reads, missing = {}, []
    for name in sorted(union, key=lambda n: (order.index(n) if n in models[0].infos else len(order), n)):
        names = [name if name in m.infos else stand_ins.get((id(m), name)) for m in models]
        if None in names:
            missing.append(name)
        else:
            reads[name] = names
    depths = [layer_counts(m.infos) for m in models]
    stack = next((k for k in depths[0] if any(d.get(k) != depths[0][k] for d in depths[1:])), None)
    if stack is not None and not skip_missing:
        found = ", ".join(f"{m.label} {d.get(stack, 0)}" for m, d in zip(models, depths))
        raise MergeError(f"the models have different numbers of layers in {stack}: {found}; "
                         f"--skip-missing merges the layers they share")
    if missing:
        holes = [f"{n} (missing in {', '.join(m.label for m in models if n not in m.infos)})" for n in missing[:3]]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        if not skip_missing:
            raise MergeError(f"{len(missing)} tensors are not in every model: {'; '.join(holes)}{more}; "
                             f"--skip-missing merges the {len(reads)} shared tensors")
        reporter.warn("missing", f"skipped {len(missing)} tensors that are not in every model: {'; '.join(holes)}{more}")
    for head in HEADS:
        users = [m.label for m in models if (id(m), head) in stand_ins]
        if users and head in reads:
            reporter.warn("tied", f"{', '.join(users)} has no {head} (tied embeddings): its input embedding "
                                  "stands in for it")
    return reads


def main_stack(model: Model) -> tuple[str, int]:
    """The layer stack slices refer to: the one config.json's layer count describes, else the longest."""
    counts = layer_counts(model.infos)
    if not counts:
        raise MergeError(f"{model.label}: no numbered layers, so slices cannot select any")
    declared = config_layer_count(model.folder)
    for stack, count in counts.items():
        if declared is not None and count == declared:
            return stack, count
    return max(counts.items(), key=lambda item: item[1])


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def config_layer_count(folder: str | None) -> int | None:
    config = read_config(folder)
    return next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)


def read_config(folder: str | None) -> dict:
    if not folder:
        return {}
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class OutputTensor:
    """An output tensor before its job is made: the group it comes from and the names it reads."""

    name: str
    group: Group
    reads: list[str]
    t: float


def plan_tensors(recipe: Recipe, groups: list[Group], models: list[Model], skip_missing: bool,
                 reporter: Reporter) -> tuple[list[OutputTensor], list[int] | None]:
    """Every output tensor in write order, and (with slices) each output layer's source layer."""
    if not recipe.sliced:
        group = groups[0]
        inputs = [models[i] for i in group.sources]
        ordered = [inputs[group.donor]] + [m for i, m in enumerate(inputs) if i != group.donor]
        reads = group_names(ordered, skip_missing, reporter)
        counts = layer_counts(ordered[0].infos)
        moved = [group.donor] + [i for i in range(len(inputs)) if i != group.donor]
        tensors = []
        for name, names in reads.items():
            per_source = [None] * len(inputs)
            for position, read in zip(moved, names):
                per_source[position] = read
            tensors.append(OutputTensor(name, group, per_source, layer_position(name, counts)))
        return tensors, None
    first = models[groups[0].sources[groups[0].donor]]
    stack, _ = main_stack(first)
    problems = []
    layer_map: list[int] = []
    layered: list[OutputTensor] = []
    for number, group in enumerate(groups):
        lengths = {b - a for a, b in group.layers}
        if len(lengths) > 1:
            problems.append(f"slices[{number}]: every source must span the same number of layers "
                            f"(got {', '.join(f'{a}-{b}' for a, b in group.layers)})")
            continue
        for position, (a, b) in zip(group.sources, group.layers):
            depth = layer_counts(models[position].infos).get(stack, 0)
            if b > depth:
                problems.append(f"slices[{number}]: layer_range [{a}, {b}) is past the depth of "
                                f"{models[position].label} ({depth} layers)")
        if problems:
            continue
        length = lengths.pop()
        donor = models[group.sources[group.donor]]
        donor_start = group.layers[group.donor][0]
        for offset in range(length):
            out_layer = len(layer_map)
            layer_map.append(donor_start + offset)
            prefix = f"{stack}.{donor_start + offset}."
            for name in donor.storage_order():
                if not name.startswith(prefix):
                    continue
                suffix = name[len(prefix):]
                names = [f"{stack}.{a + offset}.{suffix}" for a, _ in group.layers]
                absent = [models[p].label for p, n in zip(group.sources, names) if n not in models[p].infos]
                if absent:
                    problems.append(f"slices[{number}]: tensor {names[0]} is missing in {', '.join(absent)}")
                    continue
                layered.append(OutputTensor(f"{stack}.{out_layer}.{suffix}", group, names,
                                      offset / (length - 1) if length > 1 else 1.0))
    if problems:
        raise MergeError(*problems[:5], *([f"and {len(problems) - 5} more"] if len(problems) > 5 else []))
    pre, post = [], []
    for position, group in ((0, groups[0]), (-1, groups[-1])):
        inputs = [models[i] for i in group.sources]
        ordered = [inputs[group.donor]] + [m for i, m in enumerate(inputs) if i != group.donor]
        reads = group_names(ordered, skip_missing, reporter)
        moved = [group.donor] + [i for i in range(len(inputs)) if i != group.donor]
        for name, names in reads.items():
            match = LAYER.match(name)
            if match and match.group(1) == stack:
                continue
            if (PRE_LAYER.search(name) is not None) == (position == 0):
                per_source = [None] * len(inputs)
                for at, read in zip(moved, names):
                    per_source[at] = read
                (pre if position == 0 else post).append(OutputTensor(name, group, per_source, 0.0))
    return pre + layered + post, layer_map


def resolve_params(recipe: Recipe, group: Group, tensor: OutputTensor) -> tuple[dict, list[tuple[str, str]]]:
    """Every parameter's value for one tensor, and the required ones nobody gave: (param key, model).

    Per-model parameters: the model's own setting (matched against the name it reads), else the slice's,
    else the top level's, else the default. Shared ones: the slice's, the top level's, the default
    (matched against the output name).
    """
    method = recipe.method
    resolved, missing = {}, []
    models = len(group.sources) - (1 if group.base else 0)
    for p in method.params:
        if p.per_model:
            defaults = p.default(models) if callable(p.default) else [p.default] * models
            values = []
            for i in range(models):
                value = UNSET
                for level in (group.settings[i], group.slice_settings, recipe.settings):
                    if p.name in level:
                        value = evaluate(level[p.name], tensor.reads[i], tensor.t)
                        if value is not UNSET:
                            break
                if value is UNSET and p.required and recipe.from_config:
                    missing.append((p.key, i))
                values.append(defaults[i] if value is UNSET else value)
            resolved[p.name] = values
        else:
            value = UNSET
            for level in (group.slice_settings, recipe.settings):
                if p.name in level:
                    value = evaluate(level[p.name], tensor.name, tensor.t)
                    if value is not UNSET:
                        break
            if value is UNSET and p.required and (recipe.from_config or p.default is None):
                missing.append((p.key, None))
            resolved[p.name] = p.default if value is UNSET else value
    return resolved, missing


def check_shapes(models: list[Model], tensors: list[OutputTensor], vocabulary: Vocabulary | None, truncate: bool,
                 reporter: Reporter) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Output shapes, and the vocabulary tensors to re-index (name -> token axis).

    Differing vocabulary sizes are an error unless a tokenizer source aligns them or truncation is asked
    for; any other shape mismatch is an error.
    """
    problems, shapes, aligned = [], {}, {}
    for tensor in tensors:
        infos = [models[p].infos[n] for p, n in zip(tensor.group.sources, tensor.reads)]
        labels = [models[p].label for p in tensor.group.sources]
        if any(info.is_float != infos[0].is_float for info in infos):
            kinds = ", ".join(f"{label} {info.dtype}" for label, info in zip(labels, infos))
            problems.append(f"tensor {tensor.name} is floating point in some models only: {kinds}")
            continue
        shapes[tensor.name] = infos[0].shape
        listing = ", ".join(f"{label} {list(info.shape)}" for label, info in zip(labels, infos))
        axis = vocabulary_axis(tensor.name, [info.shape for info in infos])
        if vocabulary is not None and axis is not None and infos[0].is_float:
            shape = list(infos[0].shape)
            shape[axis] = vocabulary.rows
            shapes[tensor.name] = tuple(shape)
            aligned[tensor.name] = axis
            continue
        if all(info.shape == infos[0].shape for info in infos):
            continue
        if axis is None:
            problems.append(f"tensor {tensor.name} has different shapes: {listing}")
        elif not truncate:
            problems.append(f"tensor {tensor.name} has different vocabulary sizes: {listing}; the models use different "
                            "tokenizers. Align them with --tokenizer-source union (or base, or a model's path; "
                            "tokenizer_source: in a recipe), or keep the common first rows with "
                            "--unsafe-truncate-embeddings (only right if those ids mean the same tokens everywhere)")
        else:
            shape = list(infos[0].shape)
            shape[axis] = min(info.shape[axis] for info in infos)
            shapes[tensor.name] = tuple(shape)
            reporter.warn("truncate", f"tensor {tensor.name}: vocabulary truncated to the first {shape[axis]} rows "
                                      f"({listing})")
    if problems:
        more = [f"and {len(problems) - 5} more tensors differ"] if len(problems) > 5 else []
        raise MergeError(*problems[:5], *more)
    return shapes, aligned


def vocabulary_axis(name: str, shapes: list[tuple[int, ...]]) -> int | None:
    """The token axis of a vocabulary tensor (rows of an embedding or head, the columns of a [1, V] bias),
    provided the shapes differ nowhere else; None for any other tensor."""
    if not VOCABULARY.search(name) and not name.endswith("final_logits_bias"):
        return None
    first = shapes[0]
    if not first or any(len(s) != len(first) for s in shapes):
        return None
    axis = 1 if len(first) == 2 and first[0] == 1 and name.endswith("bias") else 0
    if any(s[i] != first[i] for s in shapes for i in range(len(first)) if i != axis):
        return None
    return axis


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
    if rule == methods.FLOAT32:
        return "float64" if "float64" in dtypes else "float32"
    return rule  # a plain dtype name


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


def seed_metadata(method: methods.Method, models: list[Model], settings: list[dict], params: dict) -> dict[str, str]:
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
        given = all("weight" in s for s in settings)
        meta["weights"] = json.dumps([float(s["weight"]) for s in settings] if given else params["weight"])
        meta["normalized_weights"] = json.dumps([round(w, 6) for w in methods.normalised(params["weight"])])
    return meta


def recipe_document(recipe: Recipe) -> dict:
    """The resolved recipe in mergekit's YAML shape, defaults filled in: `--config` on it repeats the merge."""
    method = recipe.method

    def given_anywhere(p: methods.Param) -> bool:
        return p.name in recipe.settings or any(p.name in piece.settings for piece in recipe.slices)

    def source_entry(source: Source, position: int, count: int, piece: Slice) -> dict:
        params = {p.key: source.settings[p.name] for p in method.params if p.name in source.settings}
        is_base = source.path in (recipe.base, piece.base) and method.uses_base
        for p in method.params:
            if p.per_model and p.key not in params and not given_anywhere(p) and not is_base and p.default is not None:
                params[p.key] = p.default(count)[position] if callable(p.default) else p.default
        entry: dict = {"model": source.path}
        if source.layers is not None:
            entry["layer_range"] = list(source.layers)
        if params:
            entry["parameters"] = params
        return entry

    doc: dict = {"merge_method": method.name}
    if recipe.base:
        doc["base_model"] = recipe.base
    if recipe.sliced:
        doc["slices"] = []
        for piece in recipe.slices:
            entry = {"sources": [source_entry(s, i, len(piece.sources), piece) for i, s in enumerate(piece.sources)]}
            if piece.base:
                entry["base_model"] = piece.base
            if piece.settings:
                entry["parameters"] = {method.param(n).key: v for n, v in piece.settings.items()}
            doc["slices"].append(entry)
    else:
        piece = recipe.slices[0]
        count = len([s for s in piece.sources if s.path != recipe.base or not method.uses_base])
        doc["models"] = [source_entry(s, i, count, piece) for i, s in enumerate(piece.sources)]
    parameters = {method.param(n).key: v for n, v in recipe.settings.items()}
    for p in method.params:
        if not p.per_model and not given_anywhere(p) and p.default is not None:
            parameters[p.key] = p.default
    doc["parameters"] = parameters
    for key, value in (("dtype", recipe.dtype), ("out_dtype", recipe.out_dtype), ("seed", recipe.seed)):
        if value is not None:
            doc[key] = value
    if recipe.tokenizer:
        doc["tokenizer"] = recipe.tokenizer
    return doc


def updated_config(path: str, out_dtype: str | None, layer_map: list[int] | None,
                   vocab_size: int | None) -> bytes | str:
    """config.json made true of the output: its dtype, its layer count and per-layer lists (slices), its
    vocabulary size (truncation). The path itself when nothing changes."""
    config = read_config(os.path.dirname(path))
    if not config:
        return path
    changed = dict(config)
    if out_dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            changed[key] = out_dtype
    if layer_map is not None:
        source_count = config_layer_count(os.path.dirname(path))
        for key in LAYER_COUNT_KEYS:
            if isinstance(config.get(key), int):
                changed[key] = len(layer_map)
        for key, value in config.items():
            if isinstance(value, list) and source_count and len(value) == source_count:
                changed[key] = [value[k] for k in layer_map]  # e.g. Qwen2's layer_types
    if vocab_size is not None and isinstance(config.get("vocab_size"), int):
        changed["vocab_size"] = vocab_size
    if changed == config:
        return path
    return (json.dumps(changed, indent=2) + "\n").encode("utf-8")


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
    """2-D weights take a matrix method's math; embeddings and output heads (vocab x hidden) do not, nor do
    empty matrices (nothing to decompose)."""
    return len(info.shape) == 2 and info.numel > 0 and not VOCABULARY.search(name)


@dataclass
class Options:
    """What planning needs besides the models: checked output, shard size, device, seed."""

    target: OutputTarget
    shard_size: int
    device: str
    seed: int | None


def check_options(recipe: Recipe, args: argparse.Namespace, reporter: Reporter) -> Options:
    method = recipe.method
    problems = flag_problems(method, args) + range_problems(recipe, args)
    if not recipe.from_config:
        if len(args.models) > MAX_INPUT_PATHS:
            problems.append(f"--models takes at most {MAX_INPUT_PATHS} paths (got {len(args.models)})")
        if args.base is not None and method.base == methods.REFUSED:
            problems.append(f"{method.name} takes no --base" + (f"; {method.base_note}" if method.base_note else ""))
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
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be at least 1 (got {args.threads})")
    seed = recipe.seed
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
    recipe.seed = seed
    return Options(target, shard_size, device, seed)


def build_recipe(args: argparse.Namespace, reporter: Reporter) -> Recipe:
    if args.config is None:
        if not args.method:
            raise MergeError("--method is required (see --help for the list), or give a recipe with --config")
        if not args.models:
            raise MergeError("--models is required: one or more checkpoints")
        return recipe_from_args(find_method(args.method), args, reporter)
    clashes = [flag for flag, value in (("--method", args.method), ("--models", args.models), ("--base", args.base))
               if value]
    if clashes:
        raise MergeError(f"{', '.join(clashes)} cannot be combined with --config: the recipe names the method and models")
    recipe = recipe_from_config(load_config(args.config), args, reporter)
    apply_flags(recipe, args)
    for field_name, value in (("dtype", args.compute_dtype), ("out_dtype", args.dtype), ("seed", args.seed)):
        if value is not None:
            setattr(recipe, field_name, value)
    if args.tokenizer_source:
        recipe.tokenizer = {**(recipe.tokenizer or {}), "source": args.tokenizer_source}
    return recipe


def plan_merge(args: argparse.Namespace, reporter: Reporter) -> Plan:
    recipe = build_recipe(args, reporter)
    options = check_options(recipe, args, reporter)
    models, index = open_models(recipe, reporter)
    try:
        return plan_jobs(recipe, models, index, options, args, reporter)
    except BaseException:
        for model in models:
            model.close()
        raise


def plan_jobs(recipe: Recipe, models: list[Model], index: dict[str, int], options: Options,
              args: argparse.Namespace, reporter: Reporter) -> Plan:
    method = recipe.method
    groups = build_groups(recipe, models, index, args, reporter)
    tensors, layer_map = plan_tensors(recipe, groups, models, args.skip_missing, reporter)
    given = args.models if not recipe.from_config else [s.path for p in recipe.slices for s in p.sources]
    check_output(options.target, args.output, models, list(given) + ([recipe.base] if recipe.base else []),
                 args.overwrite)
    vocabulary = plan_vocabulary(recipe, models, groups, reporter)
    if vocabulary is None:
        warn_on_different_tokenizers(models, reporter)
    shapes, aligned = check_shapes(models, tensors, vocabulary, args.unsafe_truncate_embeddings, reporter)
    jobs, problems = [], []
    for tensor in tensors:
        group = tensor.group
        reads = list(zip(group.sources, tensor.reads))
        infos = [models[p].infos[n] for p, n in reads]
        shape = shapes[tensor.name]
        if not infos[0].is_float:
            if any(info != infos[group.donor] for info in infos):
                reporter.warn("int-dtype", f"tensor {tensor.name}: non-float tensors differ between models; "
                                           f"copied from {models[reads[group.donor][0]].label}")
            jobs.append(Job(tensor.name, TensorInfo(infos[group.donor].dtype, shape), [reads[group.donor]]))
            continue
        params, missing = resolve_params(recipe, group, tensor)
        for key, position in missing:
            who = f" for {models[group.sources[position]].label}" if position is not None else ""
            line = (f"{method.name}: missing required parameter {key}{who}" if recipe.from_config
                    else f"{method.name}: {spelled(method.param(key), args)} is required")
            if line not in problems:
                problems.append(line)
        for line in checked(recipe, params, len(group.sources) - group.base, args, reporter):
            if line not in problems:
                problems.append(line)
        # mergekit's `dtype:` (--compute-dtype) casts every input as it is loaded; the method's own compute
        # rule then applies to the cast inputs (linear still accumulates bfloat16 inputs in float32).
        dtypes = [recipe.dtype] * len(infos) if recipe.dtype else [info.dtype for info in infos]
        compute = compute_dtype(method.compute_rule(params), dtypes, group.donor)
        out = recipe.out_dtype or recipe.dtype or compute_dtype(method.output, dtypes, group.donor)
        func, scope = method.func, method.scope
        if scope == methods.MATRIX:
            matrix = takes_matrix_path(tensor.name, TensorInfo(out, shape))
            unfit = matrix and method.matrix_problem(shape, len(group.sources) - group.base, params)
            if unfit:
                reporter.warn("matrix-fallback", f"tensor {tensor.name}: {unfit}; it takes {method.name}'s fallback, "
                                                 f"{method.fallback.__doc__}")
            matrix = matrix and not unfit
            func, scope = (method.func, methods.WHOLE) if matrix else (method.fallback, methods.ELEMENTWISE)
        seed = tensor_seed(options.seed, tensor.name) if method.random else None
        align = (vocabulary_alignment(vocabulary, models, tensor, aligned[tensor.name], reporter)
                 if tensor.name in aligned else None)
        jobs.append(Job(tensor.name, TensorInfo(out, shape), reads, params, compute, func, scope, group.base, seed,
                        align, recipe.dtype))
    if problems:
        raise MergeError(*problems)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise MergeError("the slices write the same tensor twice; check their layer ranges")

    target = options.target
    by_name = {job.name: job for job in jobs}
    entries = [(job.name, job.out) for job in jobs]
    names_per_shard = plan_shards(entries, options.shard_size) if target.is_folder else [names]
    shards = [[(n, by_name[n].out) for n in shard] for shard in names_per_shard]
    ordered = [by_name[n] for shard in names_per_shard for n in shard]
    float_dtypes = {job.out.dtype for job in jobs if job.params is not None}
    out_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
    truncated = [shapes[t.name][0] for t in tensors if EMBEDDING.search(t.name) and
                 shapes[t.name] != models[t.group.sources[0]].infos[t.reads[0]].shape]
    vocab_size = vocabulary.rows if vocabulary else min(truncated) if truncated else None

    donor = models[groups[0].sources[groups[0].donor]]
    copy_extra = target.is_folder if args.copy_extra_files is None else args.copy_extra_files
    extra: dict[str, str | bytes] = {}
    if copy_extra and donor.folder and os.path.realpath(donor.folder) != os.path.realpath(target.folder):
        for file_name, path in extra_files(donor.folder, skip={target.weights_name or ""}).items():
            if vocabulary is not None and file_name in TOKENIZER_FILES:
                continue
            extra[file_name] = (updated_config(path, out_dtype, layer_map, vocab_size)
                                if file_name == "config.json" else path)
    if copy_extra and vocabulary is not None:
        extra.update(vocabulary.files)
    document = recipe_document(recipe)
    if target.is_folder:
        extra["README.md"] = model_card(document, method, target.folder)
    first = next((job.params for job in jobs if job.params is not None), None) or {}
    first_group = [models[p] for p in groups[0].sources[:len(groups[0].sources) - groups[0].base]]
    metadata = {
        "format": "pt",
        "merge_tool": f"{TOOL} {__version__}",
        "merge_recipe": json.dumps(document),
        **seed_metadata(method, first_group, groups[0].settings, first),
    }
    return Plan(method, models, target, ordered, shards, metadata, extra, options.device, args.overwrite,
                args.output, document, args.threads)


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
    if job.params is not None and (job.scope != methods.ELEMENTWISE or job.align is not None):
        return [(0, job.out.numel)]
    return list(iter_blocks(job.out.numel, BLOCK if plan.device == "cpu" else DEVICE_BLOCK))


class BufferPool(ByteBudget):
    """The read-ahead budget, counting recycled buffers too: a buffer the merge is done with is read into
    again instead of freed, so its pages are not faulted in anew (whole tensors are larger than the mmap
    threshold, and every fresh mapping costs zeroing and a page fault per 4 KiB)."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.free: dict[int, list] = defaultdict(list)  # byte size -> idle buffers

    def take(self, size: int):
        """An idle buffer of `size` bytes, or None when a new one is to be allocated (budget taken);
        idle buffers of other sizes are dropped to make room. None too once stopped."""
        with self.cond:
            while not self.stopped:
                if self.free[size]:
                    return self.free[size].pop()
                if self.used == 0 or self.used + size <= self.limit:
                    self.used += size
                    return None
                other = next((sizes for sizes in self.free.values() if sizes), None)
                if other:
                    buffer = other.pop()
                    self.used -= buffer.numel()
                    continue
                self.cond.wait()
            return None

    def recycle(self, buffer) -> None:
        with self.cond:
            self.free[buffer.numel()].append(buffer)
            self.cond.notify_all()


class ReadAhead:
    """Reads each job's input blocks in order on a thread of its own (file reads release the GIL).

    The byte budget lets it run one block ahead of a whole job's inputs: (models + 1) blocks at most.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        largest = max((_block_bytes(plan, job, read) for job in plan.jobs for read in job.reads), default=1)
        self.budget = BufferPool((len(plan.models) + 1) * largest)
        self.items: deque = deque()
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        import torch

        try:
            for job in self.plan.jobs:
                for start, stop in job_blocks(self.plan, job):
                    for read in job.reads:
                        first, last = read_span(self.plan, job, read, start, stop)
                        model = self.plan.models[read[0]]
                        size = (last - first) * ITEMSIZE[model.infos[read[1]].dtype]
                        buffer = self.budget.take(size)
                        if self.budget.stopped:
                            return
                        if buffer is None and model.buffered(read[1]):
                            # Pinned host memory copies to a GPU asynchronously; the pool reuses it.
                            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.plan.device != "cpu")
                        self._put((model.read(read[1], first, last, buffer), size, buffer))
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

    def done_with(self, items: list, result) -> None:
        """Give the budget of a block's inputs back; buffers the result does not alias are read into again."""
        kept = result.untyped_storage().data_ptr() if result is not None and result.device.type == "cpu" else None
        for _, size, buffer in items:
            if buffer is not None and buffer.untyped_storage().data_ptr() != kept:
                self.budget.recycle(buffer)
            else:
                self.budget.release(size)

    def stop(self) -> None:
        self.budget.stop()
        if self.thread.is_alive():
            self.thread.join()


def read_span(plan: Plan, job: Job, read: tuple[int, str], start: int, stop: int) -> tuple[int, int]:
    """The elements of one input read for an output block: a vocabulary tensor to re-index is read whole."""
    return (0, plan.models[read[0]].infos[read[1]].numel) if job.align is not None else (start, stop)


def _block_bytes(plan: Plan, job: Job, read: tuple[int, str]) -> int:
    start, stop = read_span(plan, job, read, *job_blocks(plan, job)[0])
    return max(stop - start, 1) * ITEMSIZE[plan.models[read[0]].infos[read[1]].dtype]


def merge_block(plan: Plan, job: Job, inputs: list):
    """The method's output for one block of every input: output dtype for element-wise work,
    the whole tensor in the compute dtype otherwise (cast while it is written)."""
    import torch

    compute = torch_dtype(job.compute)
    device = plan.device
    keywords = dict(job.params)
    if plan.method.uses_base and not job.base:
        keywords["base"] = None  # an optional base that was not given
    if job.seed is not None:
        keywords["generator"] = torch.Generator().manual_seed(job.seed)

    def call(tensors: list):
        if job.base:
            return job.func(tensors[:-1], base=tensors[-1], **keywords)
        return job.func(tensors, **keywords)

    def loaded(x):
        """On the device in the compute dtype, through the load cast when a recipe asks for one.

        Copies to a GPU do not block: the result's copy back to the host waits for them, and only then
        are the input buffers read into again."""
        asynchronous = device != "cpu" and x.is_pinned()
        if job.load is not None:
            x = x.to(device=device, dtype=torch_dtype(job.load), non_blocking=asynchronous)
        return x.to(device=device, dtype=compute, non_blocking=asynchronous)

    if job.scope == methods.ELEMENTWISE:
        out = torch.empty(inputs[0].numel(), dtype=torch_dtype(job.out.dtype), device=device)
        step = methods.CHUNK if device == "cpu" else max(out.numel(), 1)
        for start, stop in methods.chunk_ranges(out.numel(), step):
            out[start:stop] = call([loaded(x[start:stop]) for x in inputs])
        return out
    return call([loaded(x).reshape(job.out.shape) for x in inputs]).reshape(-1)


def run_merge(plan: Plan, reporter: Reporter, strict: bool = False) -> dict:
    """Merge and write; returns the run's summary."""
    import torch

    torch.empty(0)  # finish importing torch here, before the read-ahead thread needs it
    started = time.monotonic()
    check_free_space(plan)
    writer = StreamingWriter(plan.target, plan.shards, plan.metadata, plan.extra)
    total_bytes = sum(job.out.nbytes for job in plan.jobs)
    progress = _progress(total_bytes, reporter)
    reader = ReadAhead(plan)
    try:
        with OutputLock(plan.target):
            try:
                writer.open()
                reader.start()
                behind = WriteBehind(writer, WRITE_BEHIND)
                cores = torch.get_num_threads()
                for job in plan.jobs:
                    torch.set_num_threads(job_threads(plan, job, cores))
                    _run_job(plan, job, reader, behind, reporter, strict)
                    if progress is not None:
                        progress.update(job.out.nbytes)
                behind.finish()
                reader.stop()
                stale = writer.commit(plan.overwrite)
            except BaseException:
                reader.stop()
                if "behind" in locals():
                    behind.stop()
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
    return {"method": plan.method.name, "output": plan.output_label, "tensors": len(plan.jobs),
            "bytes": total_bytes, "files": writer.names + sorted(plan.extra), "seconds": round(seconds, 3),
            "seed": plan.recipe.get("seed")}


def job_threads(plan: Plan, job: Job, cores: int) -> int:
    """Torch threads for one job: --threads, else every core for an SVD, else one.

    Streaming math is memory-bound, and the read-ahead and write-behind threads already keep the cores
    busy: a second torch thread only adds contention (measured on 2 cores: linear 8.0 s -> 5.4 s, ties
    13.7 s -> 11.6 s on 3 x 1 GB). LAPACK's SVDs do use every core.
    """
    if plan.threads is not None:
        return plan.threads
    matrix = plan.method.scope == methods.MATRIX and job.scope == methods.WHOLE
    return cores if matrix else 1


class WriteBehind:
    """Writes output blocks on a thread of its own, so that the next block is computed meanwhile.

    At most `limit` bytes wait to be written; an error of the writing thread surfaces at the next `put`
    or at `finish`. (File writes release the GIL, like the reads of the read-ahead thread.)
    """

    def __init__(self, writer: StreamingWriter, limit: int):
        self.writer = writer
        self.budget = ByteBudget(limit)
        self.items: deque = deque()
        self.ready = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self.thread.start()

    def put(self, name: str, block) -> None:
        self._raise()
        size = block.numel() * block.element_size()
        self.budget.acquire(size)
        with self.ready:
            self.items.append((name, block, size))
            self.ready.notify()

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.items:
                    self.ready.wait()
                item = self.items.popleft()
            if item is None:
                return
            name, block, size = item
            try:
                if self.error is None:
                    self.writer.write(name, block)
            except BaseException as err:  # handed to the main thread
                self.error = err
            finally:
                self.budget.release(size)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait for every block to be written."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        if self.thread.is_alive():
            with self.ready:
                self.items.append(None)
                self.ready.notify()
            self.thread.join()


def _run_job(plan: Plan, job: Job, reader: ReadAhead, writer: WriteBehind, reporter: Reporter,
             strict: bool) -> None:
    dtype = torch_dtype(job.out.dtype)
    checked = job.params is None  # copied integer tensors cannot hold NaN
    for _ in job_blocks(plan, job):
        items = [reader.take() for _ in job.reads]
        out = None
        try:
            inputs = [t for t, _, _ in items]
            if job.align is not None:
                inputs = aligned_inputs(plan, job, inputs)
            out = inputs[0] if job.params is None else _merge_reporting(plan, job, inputs, reporter)
            if out.device.type != "cpu":
                out = out.to(dtype=dtype).cpu()  # one copy back, in the output dtype (fewer bytes)
            # A whole-tensor result is cast a block at a time: no second full copy.
            for start, stop in iter_blocks(out.numel(), BLOCK):
                block = out[start:stop].to(device="cpu", dtype=dtype)
                if not checked and not all_finite(block):
                    checked = True
                    _report_non_finite(plan, job, [t for t, _, _ in items], reporter, strict)
                writer.put(job.name, block)
        finally:
            reader.done_with(items, out)


def aligned_inputs(plan: Plan, job: Job, inputs: list) -> list:
    """The inputs of a vocabulary tensor with their token rows re-indexed to the output vocabulary."""
    import torch

    a = job.align
    shaped = [x.reshape(plan.models[i].infos[n].shape).movedim(a.axis, 0) for x, (i, n) in zip(inputs, job.reads)]
    aligned = methods.align_vocabulary(shaped, torch.tensor(a.index), torch.tensor(a.fallback),
                                       torch.tensor(a.fallback_rows), torch.tensor(a.forced, dtype=torch.bool), a.rows)
    return [t.movedim(0, a.axis).contiguous().reshape(-1) for t in aligned]


def all_finite(tensor) -> bool:
    """No NaN or Inf: the extremes are finite only then (one pass, no overflow, and NaN propagates)."""
    import torch

    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8 has no aminmax of its own
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _report_non_finite(plan: Plan, job: Job, inputs: list, reporter: Reporter, strict: bool) -> None:
    """NaN or Inf about to be written: name the inputs that hold them, else blame the arithmetic."""
    holders = [plan.models[i].label for (i, _), x in zip(job.reads, inputs) if x.is_floating_point() and not all_finite(x)]
    if holders:
        message = f"tensor {job.name}: {', '.join(holders)} {'holds' if len(holders) == 1 else 'hold'} NaN or Inf values"
    else:
        message = f"tensor {job.name}: the merged values are NaN or Inf (overflow in {job.compute} or {job.out.dtype})"
    if strict:
        raise MergeError(f"{message} (--strict)")
    reporter.warn("non-finite", f"{message}; written as they are (--strict makes this an error)")


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
# dry runs, disk space and model cards

# Measured on the 2-core reference machine (implementation-notes.md §1, new-methods.md §0.5): reads from
# page cache ~1.5 GB/s, fsynced writes ~0.5 GB/s, and an exact float32 SVD costs ~2.2e-10 s per m·n·r.
READ_RATE, WRITE_RATE, SVD_COST = 1.5e9, 0.5e9, 2.2e-10


def output_bytes(plan: Plan) -> int:
    tensors = sum(job.out.nbytes for job in plan.jobs)
    extra = sum(len(c) if isinstance(c, bytes) else os.path.getsize(c) for c in plan.extra.values())
    return tensors + extra + 4096 * len(plan.shards)  # headers


def free_space(folder: str) -> tuple[str, int]:
    """The nearest existing folder on the output's path, and the bytes free there."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder, shutil.disk_usage(folder).free


def check_free_space(plan: Plan) -> None:
    """Refuse to start a run the output's disk cannot hold (an old output stays until the new one is done)."""
    folder, free = free_space(plan.target.folder)
    needed = output_bytes(plan)
    if needed > free:
        raise MergeError(f"{folder}: not enough free space for the output: it needs {_size(needed)}, "
                         f"{_size(free)} are free")


def estimated_memory(plan: Plan) -> int:
    """Peak bytes of tensor data: the read-ahead budget plus the largest job's working set."""
    reader = ReadAhead(plan)
    working = 0
    for job in plan.jobs:
        if job.params is None or job.scope == methods.ELEMENTWISE:
            continue
        width = ITEMSIZE[job.compute]
        cast = sum(job.out.numel * width for i, name in job.reads if plan.models[i].infos[name].dtype != job.compute)
        working = max(working, cast + 2 * job.out.numel * width)
    return reader.budget.limit + working + BLOCK * 8


def estimated_seconds(plan: Plan) -> float:
    read = sum(plan.models[i].infos[name].nbytes for job in plan.jobs for i, name in job.reads)
    seconds = read / READ_RATE + output_bytes(plan) / WRITE_RATE
    for job in plan.jobs:
        if plan.method.scope == methods.MATRIX and job.scope == methods.WHOLE:
            m, n = job.out.shape
            seconds += SVD_COST * m * n * min(m, n) * len(job.reads)
    return seconds


def matrix_shapes(plan: Plan) -> dict[str, int]:
    """For matrix methods: how many tensors of each shape take the SVD path ("m x n" -> count)."""
    shapes: dict[str, int] = {}
    for job in plan.jobs:
        if plan.method.scope == methods.MATRIX and job.scope == methods.WHOLE:
            key = " x ".join(map(str, job.out.shape))
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def dry_run_report(plan: Plan) -> dict:
    def model_entry(model: Model) -> dict:
        kinds = {"safetensors" if p.endswith(".safetensors") else "pytorch" for p in model.paths}
        return {"path": model.label, "format": "+".join(sorted(kinds)), "files": len(model.files),
                "bytes": model.nbytes, "tensors": len(model.infos)}

    merged = sum(1 for job in plan.jobs if job.params is not None)
    written = {job.name for job in plan.jobs}
    skipped = len(set().union(*(m.infos for m in plan.models)) - written) if plan.method.name != "passthrough" else 0
    folder, free = free_space(plan.target.folder)
    names = StreamingWriter(plan.target, plan.shards, {}, {}).names
    return {
        "method": plan.method.name,
        "recipe": plan.recipe,
        "models": [model_entry(m) for m in plan.models],
        "tensors": {"merge": merged, "copy": len(plan.jobs) - merged, "not written": skipped},
        "output": {"path": plan.output_label,
                   "files": [{"name": n, "bytes": sum(i.nbytes for _, i in shard)} for n, shard in zip(names, plan.shards)],
                   "extra_files": sorted(plan.extra)},
        "matrix_path": matrix_shapes(plan),
        "memory_bytes": estimated_memory(plan),
        "disk": {"folder": folder, "needed_bytes": output_bytes(plan), "free_bytes": free},
        "seconds_estimate": round(estimated_seconds(plan), 1),
    }


def print_dry_run(report: dict) -> None:
    lines = [f"plan: {report['method']}"]
    own = {str(m["model"]): m.get("parameters") or {} for m in report["recipe"].get("models") or []
           if isinstance(m, dict) and "model" in m}
    for entry in report["models"]:
        settings = own.get(entry["path"])
        role = "base" if entry["path"] == str(report["recipe"].get("base_model")) else "input"
        lines.append(f"  {role} {entry['path']}: {entry['format']}, {entry['files']} file(s), "
                     f"{_size(entry['bytes'])}, {entry['tensors']} tensors"
                     + ("; " + ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else ""))
    parameters = report["recipe"].get("parameters") or {}
    if parameters:
        lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in parameters.items()))
    tensors = report["tensors"]
    lines.append(f"  tensors: {tensors['merge']} merged, {tensors['copy']} copied, {tensors['not written']} not written")
    output = report["output"]
    lines.append(f"  output {output['path']}: " + ", ".join(f"{f['name']} ({_size(f['bytes'])})" for f in output["files"]))
    if output["extra_files"]:
        lines.append(f"  with {', '.join(output['extra_files'])}")
    disk = report["disk"]
    verdict = "enough" if disk["needed_bytes"] <= disk["free_bytes"] else "NOT ENOUGH"
    lines.append(f"  disk: needs {_size(disk['needed_bytes'])}, {_size(disk['free_bytes'])} free in {disk['folder']} ({verdict})")
    if report["matrix_path"]:
        lines.append("  matrix path (SVDs): " + ", ".join(f"{count} x [{shape}]" for shape, count in
                                                          report["matrix_path"].items()))
    lines.append(f"  memory: about {_size(report['memory_bytes'])} of tensor data besides the interpreter")
    lines.append(f"  time: about {report['seconds_estimate']:.0f} s (rough: disk speed and, for SVD methods, CPU cost)")
    print("\n".join(lines), file=sys.stderr)


def check_not_locked(target: OutputTarget) -> None:
    if OutputLock.held_elsewhere(target):
        raise MergeError(f"{target.folder}: the output is being written by another run")


def model_card(plan_recipe: dict, method: methods.Method, folder: str) -> bytes:
    """README.md for a folder output: what was merged, how, and the recipe that repeats it."""
    import yaml

    models = [m["model"] for m in plan_recipe.get("models", [])] or sorted(
        {s["model"] for piece in plan_recipe.get("slices", []) for s in piece["sources"]})
    recipe_text = yaml.safe_dump(plan_recipe, sort_keys=False).strip()
    name = os.path.basename(os.path.normpath(folder))
    lines = [
        "---", "tags:", "- merge", f"- {TOOL}", "---", "", f"# {name}", "",
        f"This model is a merge made with {TOOL} {__version__} using **{method.name}**: {method.summary}",
        f"({method.paper}).", "",
    ]
    if plan_recipe.get("base_model"):
        lines += [f"Base model: `{plan_recipe['base_model']}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m}`" for m in models] + ["", "## Recipe", "", "```yaml", recipe_text, "```", "",
              "## Reproduce", "", "With the same input paths, either of:", "", "```bash",
              f"python merge.py --config recipe.yml --output {name}/   # the recipe above saved as recipe.yml",
              f"python merge.py --config {name}/ --output {name}-again/   # the recipe stored in these weights",
              "```", ""]
    return "\n".join(lines).encode("utf-8")


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
    return run_cli(list(sys.argv[1:] if argv is None else argv))[0]


def run_cli(arguments: list[str]) -> tuple[int, dict]:
    """One invocation: the exit code, and the summary that --json prints."""
    reporter = Reporter(quiet="--quiet" in arguments)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    _return_freed_buffers_to_the_os()
    summary: dict = {}
    try:
        code = _main(arguments, reporter, summary)
    except MergeError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        code, summary["error"] = 2, "; ".join(err.lines)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        code, summary["error"] = 130, "interrupted"
    except Terminated:
        print("error: interrupted by SIGTERM; no output was written", file=sys.stderr)
        code, summary["error"] = 143, "interrupted by SIGTERM"
    except SystemExit as done:  # --help and --version
        return (done.code if isinstance(done.code, int) else 0), summary
    except Exception as err:
        if "--debug" in arguments:
            traceback.print_exc()
        print(f"error: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        code, summary["error"] = 1, f"internal error: {type(err).__name__}: {err}"
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if "--json" in arguments and "--jobs" not in arguments:
        warned = [f"{messages[0]}" + (f" (and {len(messages) - 1} more like it)" if len(messages) > 1 else "")
                  for messages in reporter.warnings.values()]
        print(json.dumps({"ok": code == 0, "exit_code": code, **summary, "warnings": warned}), flush=True)
    return code, summary


def run_jobs(path: str, arguments: list[str]) -> int:
    """One merge per line of `path` (blank lines and # comments skipped), each with the shared flags
    appended. Failures are reported and the batch goes on; an interrupt stops it."""
    import shlex

    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(number, line.strip()) for number, line in enumerate(handle, 1)]
    except OSError as err:
        raise MergeError(f"--jobs {path}: cannot read ({err.strerror})") from None
    jobs = [(number, line) for number, line in lines if line and not line.startswith("#")]
    shared = [a for i, a in enumerate(arguments) if a != "--jobs" and (i == 0 or arguments[i - 1] != "--jobs")]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failed = []
    for index, (number, line) in enumerate(jobs, 1):
        try:
            argv = shlex.split(line)
        except ValueError as err:
            print(f"error: --jobs {path} line {number}: {err}", file=sys.stderr)
            counts["failed"] += 1
            failed.append(number)
            continue
        if "--jobs" in argv:
            print(f"error: --jobs {path} line {number}: a job cannot run other jobs", file=sys.stderr)
            counts["failed"] += 1
            failed.append(number)
            continue
        if "--quiet" not in shared:
            print(f"job {index}/{len(jobs)} (line {number}): {line}", file=sys.stderr)
        code, summary = run_cli(argv + shared)
        if code in (130, 143):
            return code
        kind = "failed" if code else "skipped" if summary.get("skipped") else "done"
        counts[kind] += 1
        if code:
            failed.append(number)
    where = f" (lines {', '.join(map(str, failed))})" if failed else ""
    print(f"jobs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed{where}", file=sys.stderr)
    return 2 if failed else 0


def _main(arguments: list[str], reporter: Reporter, summary: dict) -> int:
    args = parse_args(arguments)
    if args.jobs:
        return run_jobs(args.jobs, arguments)
    if args.skip_existing and not args.dry_run:
        done = complete_output(args.output)
        if done:
            reporter.note(f"skipped: {args.output} exists and is complete ({done})")
            reporter.flush()
            summary.update(output=args.output, skipped=True)
            return 0
    plan = plan_merge(args, reporter)
    if args.print_config or args.dry_run:
        for model in plan.models:
            model.close()
        reporter.flush()
        if args.print_config:
            import yaml

            print(yaml.safe_dump(plan.recipe, sort_keys=False), end="")
            return 0
        report = dry_run_report(plan)
        summary.update(dry_run=report)
        print_dry_run(report)
        check_free_space(plan)
        check_not_locked(plan.target)
        return 0
    reporter.flush()
    summary.update(run_merge(plan, reporter, strict=args.strict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
