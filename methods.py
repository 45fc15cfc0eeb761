"""The catalogue of merge methods: pure tensor math, each method declared once.

A method is a small pure function of the models' tensors (one output tensor's worth, already in the
compute dtype) and keyword parameters. Per-model parameters arrive as one value per model, shared ones
as one value. The `@method` declaration beside it says everything else the tool needs: parameters with
defaults and ranges, base policy, model counts, scope, compute and output dtypes, and the properties
the tests may assert. CLI flags, `--help`, validation and the README table all come from here.

This module imports only torch and the standard library. It never opens files or prints; a method
signals a questionable input with `warnings.warn(MethodWarning(...))`, which the caller reports.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from torch import Tensor

# Scopes: how the orchestrator may feed a method.
ELEMENTWISE = "element-wise"  # each output element depends only on the same element of each input: chunked
WHOLE = "whole-tensor"  # needs reductions over the whole tensor (norms, dot products, ranks) first
MATRIX = "matrix"  # 2-D weights take the method; every other float tensor takes its element-wise fallback

# Base policies. A method that uses a base declares a keyword `base` and receives the base tensor.
REQUIRED = "required"
OPTIONAL = "optional"
INPUT = "input"  # the base is one more, equal input, appended after the models (mergekit's karcher)
UNUSED = "unused"  # a --base is ignored with a warning
REFUSED = "refused"  # a --base is an error

# Compute dtype rules (what the inputs are cast to before the method sees them).
FLOAT32 = "float32"  # float32, or float64 when any input is float64
FIRST = "first"  # the first model's dtype
PROMOTED = "promoted"  # the inputs' promoted dtype, as mergekit computes
BASE = "base"  # the base's dtype (an output rule)

# Output dtype rules (the default when neither --dtype nor a recipe sets one) use the same names.

# Properties that tests derive from the declarations (../shared/spec/decisions.md §10).
IDENTITY = "identical inputs give that input back"
ORDER_FREE = "permuting the models (with their per-model values) changes nothing but rounding"
HOMOGENEOUS = "scaling every input by c > 0 scales the output by c"

# Chunks are powers of two so that vectorised kernels never round a chunk's tail differently:
# chunked and whole-tensor results are then bit-identical. 2^18 float32 elements fit in L2 cache.
CHUNK = 1 << 18


class MethodWarning(UserWarning):
    """A questionable input that the method still handled; `kind` groups repeats into one report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Param:
    """One parameter: its default, type and valid range, and whether it takes one value per model."""

    name: str
    default: object = None  # a value; for per-model parameters also a function of the model count
    kind: type = float
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is outside the range
    high_open: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the CLI flag, when it is not --name-with-dashes
    aliases: tuple[str, ...] = ()
    help: str = ""

    @property
    def key(self) -> str:
        """The parameter's name in recipes (a trailing underscore only dodges a Python keyword)."""
        return self.name.rstrip("_")

    @property
    def default_text(self) -> str:
        if callable(self.default):
            return self.default.__doc__ or self.default.__name__
        if self.kind is bool:
            return str(self.default).lower()
        return "none" if self.default is None else f"{self.default:g}" if self.kind in (int, float) else str(self.default)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def range_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def problem(self, value) -> str | None:
        """Why `value` is invalid for this parameter, or None."""
        if value is None:
            return None
        if self.kind is bool or self.kind is str:
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)} (got {value})"
            return None
        if self.kind is int and value != int(value):
            return f"must be an integer (got {value:g})"
        if not math.isfinite(value):
            return f"value '{value}' is not a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            integer = "an integer " if self.kind is int else ""
            return f"must be {integer}{self.range_text()} (got {value:g})"
        return None


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable[..., Tensor]
    summary: str
    paper: str
    params: tuple[Param, ...]
    base: str
    min_models: int
    max_models: int | None
    scope: str
    compute: str | Callable[[dict], str]  # a rule, or a function of the resolved parameters giving one
    output: str
    properties: frozenset[str]
    check: Callable[[dict], list[tuple[str, str]]] | None  # cross-parameter checks: (param name, problem)
    when: str  # one line on when to use it, for the README
    random: bool  # takes a keyword `generator`: a torch.Generator seeded for this tensor
    fallback: Callable[..., Tensor] | None  # MATRIX scope: the element-wise function for other tensors
    seed_keys: bool  # writes the SafeTensor Model Merger's metadata keys

    @property
    def uses_base(self) -> bool:
        return self.base in (REQUIRED, OPTIONAL)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def compute_rule(self, params: dict) -> str:
        return self.compute(params) if callable(self.compute) else self.compute

    def problems(self, params: dict) -> list[tuple[str, str]]:
        return self.check(params) if self.check else []


REGISTRY: dict[str, Method] = {}


def method(*, name: str, summary: str, paper: str, when: str, params: Sequence[Param] = (),
           base: str = UNUSED, min_models: int = 1, max_models: int | None = None, scope: str = ELEMENTWISE,
           compute: str | Callable[[dict], str] = FLOAT32, output: str = FIRST,
           properties: Sequence[str] = (), check: Callable[[dict], list[tuple[str, str]]] | None = None,
           random: bool = False, fallback: Callable[..., Tensor] | None = None, seed_keys: bool = False):
    """Declare and register a method; the function itself is returned unchanged.

    `min_models` and `max_models` count the models besides a REQUIRED or OPTIONAL base. A MATRIX method
    names its `fallback`, an element-wise function with the same signature.
    """

    def register(func: Callable[..., Tensor]) -> Callable[..., Tensor]:
        expected = {p.name for p in params} | ({"base"} if base in (REQUIRED, OPTIONAL) else set()) | (
            {"generator"} if random else set())
        for function in (func, fallback) if fallback else (func,):
            code = function.__code__
            keywords = set(code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount])
            if keywords != expected:
                raise TypeError(f"method {name}: {function.__name__} takes keywords {sorted(keywords)}, "
                                f"the declaration gives {sorted(expected)}")
        if (scope == MATRIX) != (fallback is not None):
            raise TypeError(f"method {name}: a fallback goes with the matrix scope, and only with it")
        if random and scope == ELEMENTWISE:
            raise TypeError(f"method {name}: random draws must not depend on chunking; use the whole-tensor scope")
        REGISTRY[name] = Method(name, func, summary, paper, tuple(params), base, min_models, max_models, scope,
                                compute, output, frozenset(properties), check, when, random, fallback, seed_keys)
        return func

    return register


def canonical_name(text: str) -> str | None:
    """The registered name for `text`, treating '-' and '_' alike, or None."""
    wanted = text.strip().lower().replace("-", "_")
    return wanted if wanted in REGISTRY else None


def closest_names(text: str, names: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(text.lower().replace("-", "_"), list(names), n=1, cutoff=0.5)


# ---------------------------------------------------------------------------------------------------
# shared helpers


def normalised(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, in double precision."""
    total = math.fsum(weights)
    return [w / total for w in weights]


def descending(count: int) -> list[int]:
    """N, N-1, ..., 1"""
    return list(range(count, 0, -1))


def equal(count: int) -> list[float]:
    """equal"""
    return [1.0 / count] * count


def weights_sum_nonzero(params: dict) -> list[tuple[str, str]]:
    return [("weight", "sum to 0")] if abs(math.fsum(params["weight"])) < 1e-9 else []


def chunk_ranges(numel: int, chunk: int = CHUNK):
    return ((start, min(start + chunk, numel)) for start in range(0, numel, chunk))


def gram_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """G[i, j] = <t_i, t_j>, accumulated in float64 chunk by chunk (no float64 copy of a whole tensor)."""
    flats = [t.reshape(-1) for t in tensors]
    gram = torch.zeros(len(flats), len(flats), dtype=torch.float64)
    for start, stop in chunk_ranges(flats[0].numel(), max(1 << 12, CHUNK // len(flats))):
        rows = torch.stack([f[start:stop] for f in flats]).to(torch.float64)
        gram += rows @ rows.T
    return gram


def combine(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """Σ c_i t_i in the tensors' dtype, chunk by chunk (a float64 pass would cost 8x the time)."""
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(flats[0])
    for start, stop in chunk_ranges(out.numel()):
        part = out[start:stop]
        torch.mul(flats[0][start:stop], coefficients[0], out=part)
        for c, f in zip(coefficients[1:], flats[1:]):
            part.add_(f[start:stop], alpha=c)
    return out.reshape(tensors[0].shape)


# ---------------------------------------------------------------------------------------------------
# the seed methods: moving averages of training snapshots


@method(
    name="sma",
    seed_keys=True,
    summary="Simple moving average: the plain mean of the checkpoints.",
    paper="SafeTensor Model Merger (marduk191/diffusion_model_pretraining_merge)",
    when="Average the last snapshots of one training run to smooth out noise.",
    min_models=2,
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def sma(models: Sequence[Tensor]) -> Tensor:
    total = models[0]
    for x in models[1:]:
        total = total + x
    # Divide rather than multiply by 1/N: that is the reference's rounding.
    return total / len(models)


@method(
    name="ema",
    seed_keys=True,
    summary="Exponential moving average along the series; the last checkpoint weighs most.",
    paper="SafeTensor Model Merger (marduk191/diffusion_model_pretraining_merge)",
    when="Smooth a series of snapshots in order, favouring the most recent.",
    min_models=2,
    params=[Param("alpha", default=0.5, low=0.0, high=1.0, low_open=True,
                  help="EMA factor: each next checkpoint gets alpha, the running average 1 - alpha")],
    properties=[IDENTITY, HOMOGENEOUS],
)
def ema(models: Sequence[Tensor], *, alpha: float) -> Tensor:
    keep = 1.0 - alpha  # in double, then rounded to the compute dtype like alpha, as the reference does
    average = models[0]
    for x in models[1:]:
        # Separate multiply and add, in this order: the reference's bits (no fused multiply-add).
        average = alpha * x + keep * average
    return average


@method(
    name="wma",
    seed_keys=True,
    summary="Weighted moving average; by default the weights fall linearly from the first checkpoint (N, ..., 1).",
    paper="SafeTensor Model Merger (marduk191/diffusion_model_pretraining_merge)",
    when="Average a series with weights of your choice (default: the first checkpoint weighs most).",
    min_models=2,
    params=[Param("weight", default=descending, per_model=True, low=0.0, flag="--weights", aliases=("--alphas",),
                  help="one weight per model, normalised to sum to 1")],
    check=lambda p: [("weight", "sum to 0")] if math.fsum(p["weight"]) <= 0 else [],
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def wma(models: Sequence[Tensor], *, weight: Sequence[float]) -> Tensor:
    shares = normalised(weight)
    total = shares[0] * models[0]
    for share, x in zip(shares[1:], models[1:]):
        total = total + share * x
    return total


# ---------------------------------------------------------------------------------------------------
# mergekit's basics


@method(
    name="linear",
    summary="Weighted average of the models (model soup); weights are normalised unless --no-normalize.",
    paper="Model soups, arXiv 2203.05482 (mergekit 'linear')",
    when="Average fine-tunes of one base, or build a weighted soup; the fastest method.",
    params=[Param("weight", default=equal, per_model=True, flag="--weights", aliases=("--alphas",),
                  help="one weight per model"),
            Param("normalize", default=True, kind=bool, help="divide by the sum of the weights")],
    check=lambda p: ([("weight", "sum to 0 (use --no-normalize to add the models up)")]
                     if p["normalize"] and math.fsum(p["weight"]) == 0 else []),
    output=PROMOTED,
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def linear(models: Sequence[Tensor], *, weight: Sequence[float], normalize: bool) -> Tensor:
    weights = torch.tensor(weight, dtype=models[0].dtype)
    total = torch.zeros_like(models[0])
    for x, w in zip(models, weights):
        total.addcmul_(x, w)
    if normalize:
        total.div_(weights.sum())
    return total


@method(
    name="passthrough",
    summary="Copy one model through, optionally scaled: format conversion, re-sharding, dtype changes.",
    paper="mergekit 'passthrough'",
    when="Convert a .bin to safetensors, re-shard a model, or change its dtype.",
    min_models=1,
    max_models=1,
    params=[Param("scale", per_model=True, help="multiply every tensor by this factor")],
    compute=PROMOTED,
    output=PROMOTED,
    properties=[IDENTITY, HOMOGENEOUS],
)
def passthrough(models: Sequence[Tensor], *, scale: Sequence[float | None]) -> Tensor:
    return models[0] if scale[0] is None else models[0] * scale[0]


# ---------------------------------------------------------------------------------------------------
# Karcher mean on the sphere


def karcher_compute(params: dict) -> str:
    """float32 (`--karcher-compute native`: the first model's dtype)"""
    return FIRST if params["compute"] == "native" else FLOAT32


@method(
    name="karcher",
    summary="Weighted Karcher (Fréchet) mean of the directions on the sphere, with the weighted mean length.",
    paper="Karcher-merge (win10ogod/Karcher-merge); mergekit 'karcher'",
    when="Average models whose weights point in different directions without shrinking them as a plain mean does.",
    min_models=2,
    max_models=100,
    scope=WHOLE,
    params=[Param("weight", default=equal, per_model=True, flag="--weights", aliases=("--alphas",),
                  help="one weight per model, normalised (negative allowed)"),
            Param("max_iter", default=10, kind=int, low=0, flag="--karcher-iter", help="iterations at most"),
            Param("tol", default=1e-5, low=0.0, high=1.0, low_open=True, high_open=True, flag="--karcher-tol",
                  help="tolerance of every convergence and zero-norm test"),
            Param("compute", default="float32", kind=str, choices=("float32", "native"), flag="--karcher-compute",
                  help="float32: exact float32/float64 arithmetic; native: the reference's arithmetic in the "
                       "first model's dtype (for half-precision parity)")],
    compute=karcher_compute,
    check=weights_sum_nonzero,
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def karcher(models: Sequence[Tensor], *, weight: Sequence[float], max_iter: int, tol: float,
            compute: str) -> Tensor:
    alphas = normalised(weight)
    if compute == "native":
        return karcher_direct(models, alphas, max_iter, tol)
    gram = gram_matrix(models)
    norms = gram.diagonal().clamp(min=0).sqrt().tolist()
    coefficients = karcher_coefficients(gram, norms, alphas, max_iter, tol, models[0].numel())
    return combine(models, coefficients)


def karcher_coefficients(gram: Tensor, norms: list[float], alphas: list[float], max_iter: int,
                         tol: float, numel: int) -> list[float]:
    """The Karcher iteration in the span of the unit directions: returns c with result = Σ c_i t_i.

    The iterate u = Σ a_i û_i is kept as its coefficients a; every inner product the reference takes is
    a quadratic form of the unit directions' Gram matrix. One pass built the Gram matrix; one more
    writes the result.
    """
    count = len(norms)
    inverse = [1.0 / n if n > 0 else 0.0 for n in norms]
    units = gram * torch.tensor(inverse, dtype=torch.float64).outer(torch.tensor(inverse, dtype=torch.float64))
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    valid_sum = math.fsum(alphas[i] for i in valid)
    if valid_sum == 0:
        raise ValueError("the weights of the non-zero inputs sum to 0")
    beta = torch.zeros(count, dtype=torch.float64)
    for i in valid:
        beta[i] = alphas[i] / valid_sum

    def norm(coeffs: Tensor) -> float:
        return math.sqrt(max(float(coeffs @ units @ coeffs), 0.0))

    point = beta.clone()
    length = norm(point)
    if length < tol:
        if numel > 1:
            warnings.warn(MethodWarning("antipodal", "near-antipodal inputs: their mean direction is ill-defined"))
        point = torch.zeros(count, dtype=torch.float64)
        point[valid[0]] = 1.0
    else:
        point /= length
    for _ in range(max_iter):
        cosines = (units @ point).clamp(-1.0, 1.0)
        tangent = torch.zeros(count, dtype=torch.float64)
        for i in valid:
            c = float(cosines[i])
            theta = math.acos(c)
            if theta < tol or 1.0 - c * c <= 0.0:
                continue
            step = beta[i] * theta / math.sin(theta)
            tangent -= step * c * point
            tangent[i] += step
        size = norm(tangent)
        if size < tol:
            break
        point = math.cos(size) * point + math.sin(size) * tangent / size
        length = norm(point)
        if length > tol:
            point /= length
    scale = math.fsum(a * n for a, n in zip(alphas, norms))
    return [scale * float(point[i]) * inverse[i] for i in range(count)]


def karcher_direct(models: Sequence[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    """The reference's arithmetic, op for op, in the models' own dtype (norms in float32 or float64)."""
    wide = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in models]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(models, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(models[0])
    valid_sum = math.fsum(alphas[i] for i in valid)
    if valid_sum == 0:
        raise ValueError("the weights of the non-zero inputs sum to 0")
    betas = [alphas[i] / valid_sum for i in valid]
    directions = [units[i] for i in valid]
    point = torch.zeros_like(directions[0])
    for beta, unit in zip(betas, directions):
        point += beta * unit
    length = torch.linalg.vector_norm(point.to(wide))
    if length.item() < tol:
        if point.numel() > 1:
            warnings.warn(MethodWarning("antipodal", "near-antipodal inputs: their mean direction is ill-defined"))
        point = directions[0].clone()
    else:
        point = (point / length).to(point.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(point)
        for beta, unit in zip(betas, directions):
            cosine = torch.clamp(torch.dot(point.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            tangent += beta * (theta / torch.sin(theta)) * (unit - cosine * point)
        size = torch.linalg.vector_norm(tangent.to(wide))
        if size.item() < tol:
            break
        point = (torch.cos(size) * point + torch.sin(size) * (tangent / size)).to(point.dtype)
        length = torch.linalg.vector_norm(point.to(wide))
        if length.item() > tol:
            point = (point / length).to(point.dtype)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return scale * point


# ---------------------------------------------------------------------------------------------------
# mergekit's task-vector family, sce and ram (../shared/spec/mergekit-methods.md §2.6, §2.7, §2.12)
#
# Every method here computes in the inputs' (promoted) dtype with mergekit's operations in mergekit's
# order, so bf16 inputs give mergekit's bits. Whole-tensor state is one byte-per-element mask per model;
# everything else runs chunk by chunk, so memory stays near the inputs themselves.

STABLE = "stable"
MERGEKIT = "mergekit"
ROW = 1024  # row length of the deterministic float64 sums
# Below this many keys, one kthvalue costs less than building 65536-bin histograms.
RADIX_FROM = 1 << 16


def as_factor(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0/1 in `dtype`. Multiplying by it gives the bits of multiplying by the bool mask (as
    mergekit does) through torch's fast same-dtype path; mixed-dtype operations take a slow one."""
    return mask.view(torch.uint8).to(dtype)


def sum64(t: Tensor, mask: Tensor | None = None) -> float:
    """Σ t (over `mask`) in float64, with the same bits whatever the thread count.

    torch splits one big reduction among its threads, so its bits follow the thread count; here each row
    of ROW elements is summed by one thread and the row sums are added in a fixed order.
    """
    flat = t.reshape(-1)
    keep = None if mask is None else mask.reshape(-1)
    total = 0.0
    for start, stop in chunk_ranges(flat.numel()):
        part = flat[start:stop] if keep is None else flat[start:stop] * as_factor(keep[start:stop], flat.dtype)
        whole = part.numel() // ROW * ROW
        rows = part[:whole].view(-1, ROW).sum(dim=1, dtype=torch.float64).sum()
        total += float(rows + part[whole:].sum(dtype=torch.float64))
    return total


def first_in_order(keys: Tensor, count: int, *, largest: bool) -> Tensor:
    """A bool mask of the `count` elements that come first when `keys` are sorted, largest or smallest
    first, equal keys in index order (what a stable sort would select). NaN counts above every number.

    `keys` are non-negative floats or NaN (magnitudes, variances), whose bit patterns read as integers
    of the same width sort like the values. A 16-bit digit at a time, a histogram finds the boundary
    value (the count-th key); then everything strictly beyond it is kept, and boundary-equal elements in
    index order up to the count. No sort: a few passes of bincount and comparisons.
    """
    flat = keys.reshape(-1)
    total = flat.numel()
    mask = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if count >= total:
        return mask.fill_(True).view(keys.shape)
    if count <= 0:
        return mask.view(keys.shape)
    ints = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    boundary, ties = boundary_key(ints, count, largest)
    beyond = torch.gt if largest else torch.lt
    for start, stop in chunk_ranges(total):
        part = ints[start:stop]
        beyond(part, boundary, out=mask[start:stop])
        if ties:
            equal = part == boundary
            found = int(equal.count_nonzero())
            if found <= ties:
                mask[start:stop] |= equal
            else:
                mask[start:stop][equal.nonzero()[:ties, 0]] = True
            ties -= min(found, ties)
    return mask.view(keys.shape)


def boundary_key(ints: Tensor, count: int, largest: bool) -> tuple[int, int]:
    """The count-th key (as an integer) in the order asked for, and how many keys equal to it are
    taken: a radix selection, one 16-bit digit per pass, most significant first (kthvalue when few)."""
    if ints.numel() <= RADIX_FROM:
        value = int(torch.kthvalue(ints, count if not largest else ints.numel() - count + 1).values)
        return value, count - int(((ints > value) if largest else (ints < value)).count_nonzero())
    width = ints.element_size() * 8
    prefix, remaining = 0, count
    for shift in range(width - 16, -1, -16):
        histogram = torch.zeros(1 << 16, dtype=torch.int64, device=ints.device)
        for start, stop in chunk_ranges(ints.numel()):
            part = ints[start:stop]
            if shift < width - 16:
                part = part[(part >> (shift + 16)) == prefix]
            # Keys are non-negative, so the top digit needs no mask (and int16 could not hold one).
            digits = part >> shift if shift == width - 16 else (part >> shift) & 0xFFFF
            histogram += torch.bincount(digits.reshape(-1), minlength=1 << 16)
        counts = histogram.flip(0) if largest else histogram
        running = counts.cumsum(0)
        position = int(torch.searchsorted(running, remaining))
        remaining -= int(running[position - 1]) if position else 0
        prefix = (prefix << 16) | ((1 << 16) - 1 - position if largest else position)
    return prefix, remaining


def mergekit_selection(indices: Tensor, shape: torch.Size) -> Tensor:
    """The bool mask of the positions mergekit's argsort, sort or topk call picked."""
    mask = torch.zeros(shape.numel(), dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.view(shape)


def magnitude_keys(x: Tensor, base: Tensor) -> Tensor:
    """|x - base|, as mergekit ranks it: float32 keys, which order bf16/fp16 values exactly, so those
    stay 16-bit (half the passes); float64 deltas are rounded to float32 as mergekit does."""
    keys = torch.sub(x, base).abs_()
    return keys.float() if keys.dtype == torch.float64 else keys


def mergekit_keys(keys: Tensor) -> Tensor:
    """The flat keys mergekit sorts: float32 on the CPU, the native dtype elsewhere."""
    flat = keys.reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat


def magnitude_mask(x: Tensor, base: Tensor, density: float, tie_break: str) -> Tensor:
    """TIES trimming: keep the max(1, ⌊density·numel⌋) largest |δ|."""
    if density <= 0 or x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    count = max(1, int(density * x.numel()))
    keys = magnitude_keys(x, base)
    if tie_break == MERGEKIT:
        return mergekit_selection(torch.argsort(mergekit_keys(keys), descending=True)[:count], x.shape)
    return first_in_order(keys, count, largest=True)


def outlier_mask(x: Tensor, base: Tensor, density: float, gamma: float, tie_break: str) -> Tensor:
    """Breadcrumbs: drop the ⌊gamma·M⌋ largest |δ| and enough of the smallest to keep ⌊density·M⌋,
    i.e. keep the ascending positions [bottom, bottom + keep)."""
    total = x.numel()
    keep = int(density * total)
    bottom = max(0, total - keep - int(gamma * total))
    keys = magnitude_keys(x, base)
    if tie_break == MERGEKIT:
        order = torch.sort(mergekit_keys(keys), descending=False).indices
        return mergekit_selection(order[bottom:bottom + keep], x.shape)
    return first_in_order(keys, bottom + keep, largest=False) & ~first_in_order(keys, bottom, largest=False)


def uniform_draws(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 draws on the CPU generator. `draws < p` is bit for bit the mask
    torch.bernoulli(p) draws from the same generator state (both compare 24-bit uniforms with p), and
    draws taken chunk by chunk continue one stream, so chunking never changes a mask."""
    return torch.rand(tuple(shape), generator=generator).to(device)


def dare_mask(x: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each element with probability density (mergekit draws even at density 0)."""
    mask = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
    for start, stop in chunk_ranges(x.numel()):
        torch.lt(uniform_draws((stop - start,), generator, x.device), density, out=mask[start:stop])
    return mask.view(x.shape)


def rank_table(length: int, density: float, epsilon: float) -> Tensor:
    """The keep probability of each rank 0 … length - 1 of a row, in mergekit's float32 arithmetic (a row
    of one element, a crash there, takes the middle rank)."""
    rank_norm = (torch.arange(length, dtype=torch.float32) / (length - 1)).clamp(0, 1) if length > 1 else \
        torch.full((1,), 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def rank_probabilities(magnitudes: Tensor, table: Tensor, tie_break: str) -> Tensor:
    """table[rank] for each element of [A, n, R], ranked along dim 1 by value, equal values in index
    order (tie_break 'mergekit': ranked by mergekit's double argsort).

    The line an element belongs to and its value, packed into one integer, sort as (line, value): torch
    sorts a flat integer tensor with a stable radix sort, 3-6x faster than its sort along a dimension,
    and sorted position p holds rank p mod n, so the table, tiled, is scattered back in one pass."""
    if tie_break == MERGEKIT:
        return table[magnitudes.argsort(dim=1).argsort(dim=1)]
    lines, length, rest = magnitudes.shape
    value_bits = magnitudes.element_size() * 8 - 1  # non-negative: the sign bit is always 0
    line_bits = max(1, (lines * rest - 1).bit_length())
    if value_bits + line_bits > 63:  # float64 values: torch's stable sort along the dimension
        order = magnitudes.sort(dim=1, stable=True).indices
        return table.new_empty(magnitudes.shape).scatter_(1, order, table.view(1, -1, 1).expand(magnitudes.shape))
    packed_type = torch.int32 if value_bits + line_bits <= 31 else torch.int64
    values = magnitudes.view({2: torch.int16, 4: torch.int32}[magnitudes.element_size()]).to(packed_type)
    line = torch.arange(lines * rest, dtype=packed_type, device=magnitudes.device).view(lines, 1, rest)
    order = ((line << value_bits) | values).view(-1).sort(stable=True).indices
    tiled = table.repeat(lines * rest)
    return torch.empty_like(tiled).scatter_(0, order, tiled).view(magnitudes.shape)


def della_mask(x: Tensor, base: Tensor, density: float, epsilon: float, tie_break: str,
               generator: torch.Generator) -> Tensor:
    """DELLA's MagPrune: along dim 1 (a 1-D tensor is one row), the entry of rank r (1 = smallest |δ|)
    of a row of n survives with probability density - ε + 2ε·(r - 1)/(n - 1)."""
    if density <= 0 or x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    rows = (lambda t: t.reshape(1, -1, 1)) if x.dim() < 2 else (lambda t: t.reshape(t.shape[0], t.shape[1], -1))
    xs, bases = rows(x), rows(base)
    mask = torch.empty(xs.shape, dtype=torch.bool, device=x.device)
    table = rank_table(xs.shape[1], density, epsilon).to(x.device)
    step = max(1, CHUNK // max(1, xs.shape[1] * xs.shape[2]))
    for start in range(0, xs.shape[0], step):
        magnitudes = torch.sub(xs[start:start + step], bases[start:start + step]).abs_()
        probabilities = rank_probabilities(magnitudes, table, tie_break)
        torch.lt(uniform_draws(probabilities.shape, generator, x.device), probabilities,
                 out=mask[start:start + step])
    return mask.view(x.shape)


def l1_scale(x: Tensor, base: Tensor, kept: Tensor) -> Tensor | None:
    """‖δ‖₁ / ‖δ⊙m‖₁ in the compute dtype (mergekit's rescale, not DARE's 1/density); None when either
    norm is below 1e-7."""
    before = after = 0.0
    for start, stop in chunk_ranges(x.numel()):
        magnitudes = torch.sub(x.reshape(-1)[start:stop], base.reshape(-1)[start:stop]).abs_()
        before += sum64(magnitudes)
        after += sum64(magnitudes, kept[start:stop])
    before_t, after_t = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (before, after))
    if before_t < 1e-7 or after_t < 1e-7:
        return None
    return before_t / after_t


def stacked_deltas(flats: Sequence[Tensor], flat_base: Tensor, start: int, stop: int) -> Tensor:
    """The task vectors' elements [start, stop) stacked as [N, stop - start]."""
    deltas = torch.empty((len(flats), stop - start), dtype=flat_base.dtype, device=flat_base.device)
    for i, x in enumerate(flats):
        torch.sub(x[start:stop], flat_base[start:stop], out=deltas[i])
    return deltas


def elected(deltas: Tensor) -> Tensor:
    """TIES sign election over stacked deltas [N, c], as 0/1 in their dtype: the sign of the sum is the
    majority (0 counts as +), and an entry takes part when its own sign is that majority (never a zero)."""
    majority = as_factor(deltas.sum(dim=0) >= 0, deltas.dtype) * 2 - 1
    return as_factor(deltas.sign() == majority, deltas.dtype)


def merge_task_vectors(models: Sequence[Tensor], base: Tensor, weight: Sequence[float], density: Sequence[float],
                       lambda_: float, normalize: bool, rescale: bool, *, consensus: bool,
                       keep: Callable[[int, Tensor], Tensor] | None, pruning: str = "") -> Tensor:
    """mergekit's generalized task arithmetic: prune each task vector (`keep(i, x)` gives model i's
    surviving elements; None prunes nothing), optionally rescale it to its L1 norm, weight it, elect
    signs (consensus), sum, divide by the weights that took part (normalize), scale by lambda."""
    kept: list[Tensor | None] = []
    scales: list[Tensor | None] = []
    for i, x in enumerate(models):
        if keep is None or density[i] >= 1:
            if keep is not None:
                same = " (mergekit reads values above 1 as 1)" if density[i] > 1 else ""
                warnings.warn(MethodWarning("density", f"density {density[i]:g}{same} keeps every element: "
                                                       f"nothing is pruned{pruning}"))
            kept.append(None)
            scales.append(None)
            continue
        mask = keep(i, x).reshape(-1)
        kept.append(mask)
        scales.append(l1_scale(x, base, mask) if rescale else None)
    weights = torch.tensor(list(weight), dtype=base.dtype, device=base.device).view(-1, 1)
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    flats = [x.reshape(-1) for x in models]
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    for start, stop in chunk_ranges(out.numel()):
        deltas = stacked_deltas(flats, flat_base, start, stop)
        for i in range(len(flats)):
            if kept[i] is not None:
                deltas[i].mul_(as_factor(kept[i][start:stop], deltas.dtype))
            if scales[i] is not None:
                deltas[i].mul_(scales[i])
        deltas.mul_(weights)
        if consensus:
            agree = elected(deltas)
            mixed = deltas.mul_(agree).sum(dim=0)
            divisor = agree.mul_(weights).sum(dim=0)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = deltas.sum(dim=0)
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        torch.add(flat_base[start:stop], mixed, out=out[start:stop])
    return out.view(base.shape)


NO_EFFECT = "accepted for mergekit recipes; no effect"
# mergekit stores its masks in int8 with it; ours always take one byte, so it changes nothing
INT8_MASK = Param("int8_mask", default=False, kind=bool, help=NO_EFFECT)


def tv_params(normalize: bool, rescale: bool, *extra: Param, prunes: bool = True) -> list[Param]:
    """The parameters mergekit's generalized task arithmetic takes, with this method's defaults."""
    return [
        Param("weight", default=1.0, per_model=True, flag="--weights", aliases=("--alphas",),
              help="scale of each model's task vector (model - base); negative subtracts it"),
        Param("density", default=1.0, per_model=True, low=0.0,
              help="fraction of each task vector kept (1 keeps all)" if prunes else NO_EFFECT),
        *extra,
        Param("lambda_", default=1.0, help="scale of the merged task vector"),
        Param("normalize", default=normalize, kind=bool,
              help="divide by the sum of the weights (TIES variants: of the models that agree with the elected sign)"),
        Param("rescale", default=rescale, kind=bool,
              help="scale each pruned task vector back to its L1 norm" if prunes else NO_EFFECT),
        INT8_MASK,
    ]


TIE_BREAK = Param("tie_break", default=STABLE, kind=str, choices=(STABLE, MERGEKIT),
                  help="equal magnitudes at the cut: stable keeps the lower index (fast partial selection); "
                       "mergekit makes mergekit 0.1.5's sort calls (its exact selection, at its speed)")
GAMMA = Param("gamma", default=0.01, per_model=True, low=0.0, help="fraction of the largest entries removed as outliers")
EPSILON = Param("epsilon", default=0.15, per_model=True, low=0.0,
                help="keep probabilities run from density - epsilon (smallest entry of a row) to density + epsilon")


def epsilon_band(params: dict) -> list[tuple[str, str]]:
    """DELLA's probabilities density ± epsilon must lie in (0, 1) wherever it prunes (mergekit raises)."""
    problems = []
    for i, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            which = f" for model {i + 1}" if len(params["density"]) > 1 else ""
            problems.append(("epsilon", f"{epsilon:g} with density {density:g}{which} puts density ± epsilon "
                                        f"outside (0, 1); use an epsilon below {min(density, 1 - density):g}"))
    return problems


TASK_VECTOR = dict(base=REQUIRED, min_models=1, compute=PROMOTED, output=PROMOTED)
TRIMMED_TASK_VECTOR = dict(TASK_VECTOR, scope=WHOLE, properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS])
# random draws follow the model order, so permuting the models changes the masks
RANDOM_TASK_VECTOR = dict(TASK_VECTOR, scope=WHOLE, random=True, properties=[IDENTITY, HOMOGENEOUS])
DARE_PAPER = "DARE (Language models are Super Mario), arXiv 2311.03099"
DELLA_PAPER = "DELLA-Merging, arXiv 2406.11617"
BREADCRUMBS_PAPER = "Model Breadcrumbs, arXiv 2312.06795"


@method(
    name="task_arithmetic",
    summary="Base plus the weighted sum of the task vectors (model - base), scaled by lambda.",
    paper="Editing models with task arithmetic, arXiv 2212.04089 (mergekit 'task_arithmetic')",
    when="Add (or, with a negative weight, subtract) fine-tunes' changes to a base.",
    params=tv_params(False, False, prunes=False),
    **TASK_VECTOR,
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def task_arithmetic(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], density: Sequence[float],
                    lambda_: float, normalize: bool, rescale: bool, int8_mask: bool) -> Tensor:
    if any(d != 1 for d in density) or rescale:
        warnings.warn(MethodWarning("unused", "task_arithmetic prunes nothing: density and rescale have no effect"))
    return merge_task_vectors(models, base, weight, density, lambda_, normalize, False, consensus=False, keep=None)


@method(
    name="ties",
    summary="Trim each task vector to its largest entries, elect a sign per element, average the agreeing ones.",
    paper="TIES-Merging, arXiv 2306.01708 (mergekit 'ties')",
    when="Merge several fine-tunes of one base while limiting their interference.",
    params=[*tv_params(True, False), TIE_BREAK],
    **TRIMMED_TASK_VECTOR,
)
def ties(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], density: Sequence[float],
         lambda_: float, normalize: bool, rescale: bool, int8_mask: bool, tie_break: str) -> Tensor:
    return merge_task_vectors(models, base, weight, density, lambda_, normalize, rescale, consensus=True,
                              keep=lambda i, x: magnitude_mask(x, base, density[i], tie_break))


def dare_merge(consensus: bool) -> Callable[..., Tensor]:
    """DARE's pruning, followed by TIES's sign election or not."""

    def merge(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], density: Sequence[float],
              lambda_: float, normalize: bool, rescale: bool, int8_mask: bool, generator: torch.Generator) -> Tensor:
        return merge_task_vectors(models, base, weight, density, lambda_, normalize, rescale, consensus=consensus,
                                  keep=lambda i, x: dare_mask(x, density[i], generator))

    return merge


def della_merge(consensus: bool) -> Callable[..., Tensor]:
    """DELLA's pruning, followed by TIES's sign election or not."""

    def merge(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], density: Sequence[float],
              epsilon: Sequence[float], lambda_: float, normalize: bool, rescale: bool, int8_mask: bool,
              tie_break: str, generator: torch.Generator) -> Tensor:
        return merge_task_vectors(
            models, base, weight, density, lambda_, normalize, rescale, consensus=consensus,
            keep=lambda i, x: della_mask(x, base, density[i], epsilon[i], tie_break, generator))

    return merge


def breadcrumbs_merge(consensus: bool) -> Callable[..., Tensor]:
    """Breadcrumbs' two-sided trimming, followed by TIES's sign election or not."""

    def merge(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], density: Sequence[float],
              gamma: Sequence[float], lambda_: float, normalize: bool, rescale: bool, int8_mask: bool,
              tie_break: str) -> Tensor:
        return merge_task_vectors(models, base, weight, density, lambda_, normalize, rescale, consensus=consensus,
                                  pruning=" and no outliers are removed, whatever gamma is",
                                  keep=lambda i, x: outlier_mask(x, base, density[i], gamma[i], tie_break))

    return merge


dare_linear = method(
    name="dare_linear",
    summary="Drop task-vector entries at random (keep each with probability density), rescale, add up.",
    paper=f"{DARE_PAPER} (mergekit 'dare_linear')",
    when="Combine fine-tunes with sparse random pruning and no sign election.",
    params=tv_params(False, True),
    **RANDOM_TASK_VECTOR,
)(dare_merge(consensus=False))

dare_ties = method(
    name="dare_ties",
    summary="DARE's random pruning and rescaling, then TIES's sign election.",
    paper=f"{DARE_PAPER} (mergekit 'dare_ties')",
    when="The usual choice for merging several LLM fine-tunes of one base.",
    params=tv_params(False, True),
    **RANDOM_TASK_VECTOR,
)(dare_merge(consensus=True))

della = method(
    name="della",
    summary="Prune at random with keep probabilities that grow with each entry's magnitude rank, then elect signs.",
    paper=f"{DELLA_PAPER} (mergekit 'della')",
    when="Like dare_ties, but large changes are likelier to survive.",
    params=[*tv_params(True, True, EPSILON), TIE_BREAK],
    check=epsilon_band,
    **RANDOM_TASK_VECTOR,
)(della_merge(consensus=True))

della_linear = method(
    name="della_linear",
    summary="DELLA's magnitude-ranked random pruning, without sign election.",
    paper=f"{DELLA_PAPER} (mergekit 'della_linear')",
    when="Like dare_linear, but large changes are likelier to survive.",
    params=[*tv_params(False, True, EPSILON), TIE_BREAK],
    check=epsilon_band,
    **RANDOM_TASK_VECTOR,
)(della_merge(consensus=False))

breadcrumbs = method(
    name="breadcrumbs",
    summary="Drop both the largest (outliers, gamma) and the smallest task-vector entries, then add up.",
    paper=f"{BREADCRUMBS_PAPER} (mergekit 'breadcrumbs')",
    when="Merge fine-tunes while discarding both noise and outlier changes.",
    params=[*tv_params(False, False, GAMMA), TIE_BREAK],
    **TRIMMED_TASK_VECTOR,
)(breadcrumbs_merge(consensus=False))

breadcrumbs_ties = method(
    name="breadcrumbs_ties",
    summary="Breadcrumbs' two-sided trimming, then TIES's sign election.",
    paper=f"{BREADCRUMBS_PAPER} (mergekit 'breadcrumbs_ties')",
    when="Breadcrumbs for fine-tunes whose changes conflict in sign.",
    params=[*tv_params(False, False, GAMMA), TIE_BREAK],
    **TRIMMED_TASK_VECTOR,
)(breadcrumbs_merge(consensus=True))


def population_variance(rows: Tensor) -> Tensor:
    """torch.var(rows, dim=0, unbiased=False), bit for bit: torch's own Welford updates in float64, one
    row at a time, written out because torch's reduction over the leading axis is ~30x slower."""
    mean = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    m2 = torch.zeros_like(mean)
    for count, row in enumerate(rows.to(torch.float64), start=1):
        delta = row - mean
        mean += delta / count
        m2 += delta * (row - mean)
    return (m2 / rows.shape[0]).to(rows.dtype)


def variance_selection(flats: Sequence[Tensor], flat_base: Tensor, fraction: float, tie_break: str) -> Tensor:
    """SCE's select step: the ⌊nonzero·fraction⌋ elements whose task vectors vary most across models."""
    variance = torch.empty_like(flat_base)
    for start, stop in chunk_ranges(variance.numel()):
        variance[start:stop] = population_variance(stacked_deltas(flats, flat_base, start, stop))
    count = int(int(torch.count_nonzero(variance)) * fraction)
    keys = variance.abs_()
    if tie_break == MERGEKIT and count > 0:
        return mergekit_selection(torch.topk(keys, k=count, largest=True).indices, keys.shape)
    return first_in_order(keys, count, largest=True)


@method(
    name="sce",
    summary="Select the elements whose task vectors vary most, weight each model by its mean squared change, "
            "elect signs.",
    paper="FuseChat / SCE, arXiv 2408.07990 (mergekit 'sce')",
    when="Merge fine-tunes without choosing weights: they come from the data.",
    params=[Param("select_topk", default=1.0, low=0.0,
                  help="fraction of the non-zero-variance elements kept (1 keeps all)"),
            INT8_MASK,
            TIE_BREAK],
    scope=WHOLE,
    base=REQUIRED, compute=PROMOTED, output=PROMOTED,
    properties=[IDENTITY, ORDER_FREE],
)
def sce(models: Sequence[Tensor], *, base: Tensor, select_topk: float, int8_mask: bool, tie_break: str) -> Tensor:
    flats = [x.reshape(-1) for x in models]
    flat_base = base.reshape(-1)
    total = flat_base.numel()
    out = torch.empty_like(flat_base)
    if total == 0:
        return out.view(base.shape)
    selected = None
    if select_topk <= 0:
        selected = torch.zeros(total, dtype=torch.bool, device=base.device)
    elif select_topk < 1:
        selected = variance_selection(flats, flat_base, select_topk, tie_break)
    # Calculate: each model's weight is its mean squared (selected) change, normalised; 1/N if they are all ~0.
    squares = [0.0] * len(flats)
    for start, stop in chunk_ranges(total):
        deltas = stacked_deltas(flats, flat_base, start, stop)
        if selected is not None:
            deltas.mul_(as_factor(selected[start:stop], deltas.dtype))
        for i, row in enumerate(deltas.square_()):
            squares[i] += sum64(row)
    means = torch.tensor([s / total for s in squares], dtype=torch.float64).to(base.dtype)
    weight_sum = means.sum().item()
    shares = (torch.ones_like(means) / len(flats) if abs(weight_sum) < 1e-6 else means / weight_sum)
    shares = shares.to(base.device).view(-1, 1)
    for start, stop in chunk_ranges(total):
        deltas = stacked_deltas(flats, flat_base, start, stop)
        if selected is not None:
            deltas.mul_(as_factor(selected[start:stop], deltas.dtype))
        erased = shares * elected(deltas)  # Erase: only the entries that agree with the elected sign count
        merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
        torch.add(flat_base[start:stop], merged, out=out[start:stop])
    return out.view(base.shape)


def ram_masks(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Which entries changed (|τ| > ε), as 0/1 in the deltas' dtype, and how many models changed each
    element (exact in any dtype: at most 100 models)."""
    active = as_factor(deltas.abs() > epsilon, deltas.dtype)
    return active, active.sum(dim=0, keepdim=True)


@method(
    name="ram",
    summary="Keep each change made by one model whole; average the changes several models made.",
    paper="Reinforced Agent Merging, arXiv 2601.13572 (mergekit 'ram')",
    when="Merge agents fine-tuned from one base that each changed different weights.",
    params=[Param("epsilon", default=1e-5, low=0.0, help="changes of at most epsilon count as unchanged")],
    base=REQUIRED, compute=PROMOTED, output=PROMOTED,
    properties=[IDENTITY, ORDER_FREE],
)
def ram(models: Sequence[Tensor], *, base: Tensor, epsilon: float) -> Tensor:
    flats = [x.reshape(-1) for x in models]
    deltas = stacked_deltas(flats, base.reshape(-1), 0, base.numel())
    active, counts = ram_masks(deltas, epsilon)
    # mergekit adds z·[c = 1] + z·[c > 1] / max(c, 1) for z = τ·active: one term is z or z / c and the
    # other a zero of z's sign, so each sum is exactly z / max(c, 1), with the same bits and half the work
    merged = (deltas.mul_(active) / counts.clamp(min=1)).sum(dim=0)
    return base + merged.view(base.shape)


@method(
    name="ramplus_tl",
    summary="RAM, with each model's unique changes amplified by how much of its change the others share.",
    paper="Reinforced Agent Merging, arXiv 2601.13572 (mergekit 'ramplus_tl')",
    when="RAM for agents whose changes overlap a lot, so their unique parts would be diluted.",
    params=[Param("r", default=0.1, low=0.0, flag="--ram-r", help="amplification per unit of shared/unique ratio"),
            Param("alpha", default=0.2, low=0.0, flag="--ram-alpha", help="cap on the shared/unique ratio"),
            Param("epsilon", default=1e-5, low=0.0, help="changes of at most epsilon count as unchanged")],
    scope=WHOLE,
    base=REQUIRED, compute=PROMOTED, output=PROMOTED,
    properties=[IDENTITY, ORDER_FREE],
)
def ramplus_tl(models: Sequence[Tensor], *, base: Tensor, r: float, alpha: float, epsilon: float) -> Tensor:
    flats = [x.reshape(-1) for x in models]
    flat_base = base.reshape(-1)
    shared = torch.zeros(len(flats), dtype=torch.float64, device=base.device)
    unique_counts = torch.zeros_like(shared)
    for start, stop in chunk_ranges(flat_base.numel()):
        active, counts = ram_masks(stacked_deltas(flats, flat_base, start, stop), epsilon)
        shared += (active * as_factor(counts > 1, active.dtype)).sum(dim=1, dtype=torch.float64)
        unique_counts += (active * as_factor(counts == 1, active.dtype)).sum(dim=1, dtype=torch.float64)
    shared, unique_counts = shared.to(torch.int64), unique_counts.to(torch.int64)
    # mergekit's expression: the ratio and the factor are float32 tensors, which promote half inputs
    ratio = shared / unique_counts.clamp(min=epsilon)
    factor = (1 + r * ratio.clamp(min=0, max=alpha)).unsqueeze(-1)
    out = torch.empty(flat_base.shape, dtype=torch.promote_types(base.dtype, factor.dtype), device=base.device)
    for start, stop in chunk_ranges(flat_base.numel()):
        deltas = stacked_deltas(flats, flat_base, start, stop)
        active, counts = ram_masks(deltas, epsilon)
        changed = deltas.mul_(active)
        # as in ram, of mergekit's two terms z·[c = 1]·λ and z·[c > 1] / max(c, 1) one is a signed zero
        merged = torch.where(counts == 1, changed * factor, changed / counts.clamp(min=1)).sum(dim=0)
        torch.add(flat_base[start:stop], merged, out=out[start:stop])
    return out.view(base.shape)
