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
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

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
    mergekit_variant: bool = False  # mergekit's semantics of a name whose default semantics differ (MERGEKIT_VARIANTS)

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

# mergekit's semantics of a registered name, where ours differ (karcher: the seed script's weighted mean vs
# mergekit's equal-weight mean over the models and the base). Recipes always take the variant; the command
# line takes it when a --base is given.
MERGEKIT_VARIANTS: dict[str, Method] = {}


def method(*, name: str, summary: str, paper: str, when: str, params: Sequence[Param] = (),
           base: str = UNUSED, min_models: int = 1, max_models: int | None = None, scope: str = ELEMENTWISE,
           compute: str | Callable[[dict], str] = FLOAT32, output: str = FIRST,
           properties: Sequence[str] = (), check: Callable[[dict], list[tuple[str, str]]] | None = None,
           random: bool = False, fallback: Callable[..., Tensor] | None = None, seed_keys: bool = False,
           mergekit_variant: bool = False):
    """Declare and register a method; the function itself is returned unchanged.

    `min_models` and `max_models` count the models besides a REQUIRED or OPTIONAL base. A MATRIX method
    names its `fallback`, an element-wise function with the same signature. `mergekit_variant` declares
    mergekit's semantics of an already registered name (see MERGEKIT_VARIANTS).
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
        if mergekit_variant and name not in REGISTRY:
            raise TypeError(f"method {name}: declare the default semantics before mergekit's variant")
        table = MERGEKIT_VARIANTS if mergekit_variant else REGISTRY
        table[name] = Method(name, func, summary, paper, tuple(params), base, min_models, max_models, scope,
                             compute, output, frozenset(properties), check, when, random, fallback, seed_keys,
                             mergekit_variant)
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


KARCHER_ITERATIONS = Param("max_iter", default=10, kind=int, low=0, flag="--karcher-iter", help="iterations at most")


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
            KARCHER_ITERATIONS,
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
# mergekit's geometric methods: slerp, nuslerp, multislerp, karcher (mergekit's variant), model_stock,
# nearswap, arcee_fusion
#
# Each replays mergekit 0.1.5's arithmetic op for op in the dtype mergekit computes in, so bf16 inputs give
# its bits. One departure: a reduction to a single number (a whole-tensor dot product) is added up the way
# one thread adds it (`ordered_sum`), so our bits do not change with the thread count; mergekit's do, and
# equal ours when it runs on one thread.


def ordered_sum(x: Tensor) -> Tensor:
    """x.sum() as one thread adds it up, whatever the thread count.

    torch splits a reduction with one output among threads, which changes its rounding with their number.
    With two outputs (the same row twice: a stride-0 view, no copy) each row is summed by one thread, in
    the order torch uses for every row of a matrix.
    """
    return x.reshape(1, -1).expand(2, -1).sum(-1)[0]


def row_sums(x: Tensor) -> Tensor:
    """x.sum(-1, keepdim=True) in a fixed order: a lone row goes through ordered_sum."""
    if x.dim() == 0:
        return x.clone()
    if math.prod(x.shape[:-1]) == 1:
        return ordered_sum(x).reshape(x.shape[:-1] + (1,))
    return x.sum(-1, keepdim=True)


def stacked_sum(terms: Iterable[Tensor]) -> Tensor:
    """torch.stack(terms).sum(0) without the stack, one term alive at a time: half precision adds up in
    float32 and rounds once, as torch's sum does."""
    terms = iter(terms)
    term = next(terms)
    dtype = term.dtype
    total = torch.zeros(term.shape, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
                        device=term.device)
    while term is not None:
        total += term
        del term  # before the next term is made
        term = next(terms, None)
    return total.to(dtype)


def required(name: str) -> Callable[[dict], list[tuple[str, str]]]:
    """A check that a parameter without a default was given."""
    return lambda params: [(name, "is required")] if params[name] is None else []


SLERP_CHUNK = 1 << 20  # mergekit's slerp reduces chunks this long, then their results


def slerp_norm(v: Tensor) -> Tensor:
    """||v|| as mergekit's slerp takes it: the norm of the chunks' norms."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v[start:stop])
                                                 for start, stop in chunk_ranges(v.numel(), SLERP_CHUNK)]))


@method(
    name="slerp",
    summary="Spherical interpolation from the base (t = 0) to one model (t = 1) along the arc between them.",
    paper="Shoemake, SIGGRAPH 1985; mergekit 'slerp'",
    when="Blend two models, often with a per-layer gradient of t (--t 0 0.5 1).",
    base=REQUIRED,
    min_models=1,
    max_models=1,
    scope=WHOLE,
    compute=FLOAT32,
    output=PROMOTED,
    params=[Param("t", help="position from the base (0) to the model (1); several values form a per-layer gradient")],
    check=required("t"),
    properties=[IDENTITY, HOMOGENEOUS],
)
def slerp(models: Sequence[Tensor], *, t: float, base: Tensor) -> Tensor:
    if not 0.0 <= t <= 1.0:
        warnings.warn(MethodWarning("extrapolate", f"t = {t:g} lies outside [0, 1], so slerp extrapolates"))
    # float32 even when a --compute-dtype (mergekit's `dtype:`) has cast the inputs to half precision, as
    # mergekit's slerp does
    wide = torch.float64 if base.dtype == torch.float64 else torch.float32
    v0, v1 = base.reshape(-1).to(wide), models[0].reshape(-1).to(wide)
    t = torch.tensor(t, dtype=wide, device=v0.device)
    if v0.numel() == 0:
        return v0.reshape(base.shape)
    # A zero tensor is divided by 1, not 0: its cosine with anything is 0, a quarter turn.
    n0, n1 = (torch.where(n > 1e-8, n, 1) for n in (slerp_norm(v0), slerp_norm(v1)))
    parts = [ordered_sum((v0[start:stop] / n0) * (v1[start:stop] / n1))
             for start, stop in chunk_ranges(v0.numel(), SLERP_CHUNK)]
    dot = torch.stack(parts).sum(0).clamp(-1, 1)
    if dot.abs() > 0.9995:
        # Nearly parallel or opposite: the arc's plane is ill-defined, the straight line is not.
        c0, c1 = 1 - t, t
    else:
        theta = torch.acos(dot)
        c0, c1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    out = torch.empty_like(v0)
    for start, stop in chunk_ranges(v0.numel()):
        torch.add(c0 * v0[start:stop], c1 * v1[start:stop], out=out[start:stop])
    return out.reshape(base.shape)


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, flatten: bool, row_wise: bool) -> Tensor:
    """nuslerp's interpolation of v0 and v1 at t: one arc for the whole tensor, or one per row."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u0 *= v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = row_sums(u0).clamp(-1, 1)
    del u0
    colinear = (1 - cos.square()) <= 1e-8**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = torch.sin((1 - t) * theta) * v0
    result += torch.sin(t * theta) * v1
    result /= torch.sin(theta)
    if colinear.any():
        straight = (1 - t) * v0
        straight += t * v1
        result = torch.where(colinear, straight, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@method(
    name="nuslerp",
    summary="Slerp of two models at t = w2 / (w1 + w2), one arc per tensor or per row; with a base, of their "
            "task vectors.",
    paper="mergekit 'nuslerp'",
    when="Slerp two fine-tunes by weight, or their changes from a common base (--base).",
    base=OPTIONAL,
    min_models=2,
    max_models=2,
    scope=WHOLE,
    compute=PROMOTED,
    output=PROMOTED,
    params=[Param("weight", default=equal, per_model=True, flag="--weights", aliases=("--alphas",),
                  help="one weight per model; t = w2 / (w1 + w2), 0.5 when they sum to 0"),
            Param("nuslerp_flatten", default=True, kind=bool,
                  help="one arc for the whole tensor; --no-nuslerp-flatten: one per vector"),
            Param("nuslerp_row_wise", default=False, kind=bool,
                  help="without flattening, vectors along the first axis (a weight's columns) instead of the last")],
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def nuslerp(models: Sequence[Tensor], *, weight: Sequence[float], nuslerp_flatten: bool, nuslerp_row_wise: bool,
            base: Tensor | None) -> Tensor:
    if nuslerp_row_wise and nuslerp_flatten:
        warnings.warn(MethodWarning("row-wise", "--nuslerp-row-wise does nothing while flattening "
                                                "(add --no-nuslerp-flatten)"))
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return slerp_vectors(t, models[0], models[1], nuslerp_flatten, nuslerp_row_wise)
    return base + slerp_vectors(t, models[0] - base, models[1] - base, nuslerp_flatten, nuslerp_row_wise)


@method(
    name="multislerp",
    summary="Weighted spherical mean of several models in one tangent-space step; with a base, of their task "
            "vectors.",
    paper="Goddard, 'Multi-SLERP' (goddard.blog); mergekit 'multislerp'",
    when="Slerp more than two models at once.",
    base=OPTIONAL,
    min_models=1,
    scope=WHOLE,
    compute=PROMOTED,
    output=PROMOTED,
    params=[Param("weight", default=equal, per_model=True, flag="--weights", aliases=("--alphas",),
                  help="one weight per model"),
            Param("normalize_weights", default=True, kind=bool, help="divide the weights by their sum"),
            Param("eps", default=1e-8, low=0.0, low_open=True, help="added to norms before dividing by them")],
    check=lambda p: ([("weight", "sum to 0 (use --no-normalize-weights to take them as they are)")]
                     if p["normalize_weights"] and math.fsum(p["weight"]) == 0 else []),
    properties=[ORDER_FREE],
)
def multislerp(models: Sequence[Tensor], *, weight: Sequence[float], normalize_weights: bool, eps: float,
               base: Tensor | None) -> Tensor:
    if len(models) == 1 or models[0].numel() == 0:
        return models[0]
    shape = models[0].shape
    weights = torch.tensor(weight, dtype=models[0].dtype, device=models[0].device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms, units = [], []
    for x in models:
        vector = (x if base is None else x - base).reshape(-1)
        norms.append(torch.norm(vector))
        units.append(vector / (norms[-1] + eps))
        del vector  # before the next one is made
    mean = stacked_sum(u * w for u, w in zip(units, weights))
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) > 2:
            raise ValueError("the weighted directions cancel out (the models, or their task vectors, are zero "
                             "or opposite with balancing weights)")
        # Two opposite directions: mergekit falls back to the straight line between the models.
        first, second = ((x if base is None else x - base) for x in models)
        result = first * weights[0] + second * weights[1]
        return result if base is None else result + base
    mean /= mean_norm
    for u in units:  # each unit vector becomes its projection onto the tangent plane at the mean
        u -= row_sums(u * mean) * mean
    tangent = stacked_sum(u * w for u, w in zip(units, weights))
    del units
    size = torch.norm(tangent) + eps
    result = mean  # the exponential map's step from the mean, in place
    result *= torch.cos(size)
    result += tangent * (torch.sin(size) / size)
    result *= (torch.stack(norms) * weights).sum()
    result = result.reshape(shape)
    if base is not None:
        result += base
    return result


@method(
    name="karcher",
    mergekit_variant=True,
    summary="mergekit's Karcher mean: equal weights over the models and the base, in the inputs' dtype.",
    paper="Karcher-merge (win10ogod/Karcher-merge); mergekit 'karcher'",
    when="Give mergekit's karcher result: --method karcher --base B (the base is one more, equal input).",
    base=INPUT,
    min_models=1,
    scope=WHOLE,
    compute=PROMOTED,
    output=PROMOTED,
    params=[KARCHER_ITERATIONS,
            Param("tol", default=1e-5, low=0.0, flag="--karcher-tol",
                  help="tolerance of every convergence and zero-norm test")],
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def karcher_mergekit(models: Sequence[Tensor], *, max_iter: int, tol: float) -> Tensor:
    if len(models) == 1:
        return models[0]
    return karcher_direct(models, equal(len(models)), max_iter, tol)


@method(
    name="model_stock",
    summary="Moves from the base towards the fine-tunes' mean, by a factor set by the angles between their task "
            "vectors.",
    paper="Model Stock, Jang et al., ECCV 2024, arXiv 2403.19522",
    when="Average several fine-tunes of one base without choosing weights.",
    base=REQUIRED,
    min_models=2,
    scope=WHOLE,
    compute=PROMOTED,
    output=PROMOTED,
    params=[Param("filter_wise", default=False, kind=bool, help="one factor per row (last axis), not per tensor")],
    properties=[IDENTITY, ORDER_FREE],
)
def model_stock(models: Sequence[Tensor], *, filter_wise: bool, base: Tensor) -> Tensor:
    def vectors(x: Tensor) -> Tensor:
        return (x.reshape(1, -1) if x.dim() < 2 else x) if filter_wise else x.reshape(-1)

    origin, points = vectors(base), [vectors(x) for x in models]
    # Task vectors are made again for each pair: memory for two of them, not for all.
    norms = [torch.norm(p - origin, dim=-1) for p in points]
    cosines = []
    for a in range(len(points)):
        for b in range(a + 1, len(points)):
            dots = row_sums((points[a] - origin) * (points[b] - origin)).squeeze(-1)
            cosines.append((dots / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(points)
    denominator = 1 + (count - 1) * cos_theta
    # Where the denominator vanishes there is no finite factor: keep the base there.
    singular = denominator.abs() < 1e-6
    denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / denominator)
    result = sum(points) / count
    result *= t
    result += (1 - t) * origin
    return result.reshape(base.shape)


@method(
    name="nearswap",
    summary="Takes the model's value where it lies within t of the base's, and less of it the farther apart they "
            "are: w = clamp(t / abs(base - model), 0, 1).",
    paper="alchemonaut, QuartetAnemoi-70B-t0.0001; mergekit 'nearswap'",
    when="Take a fine-tune's small changes into its base and keep the base where they differ a lot.",
    base=REQUIRED,
    min_models=1,
    max_models=1,
    compute=PROMOTED,
    output=PROMOTED,
    params=[Param("t", low=0.0, help="distance below which the model's value is taken whole")],
    check=required("t"),
    properties=[IDENTITY],
)
def nearswap(models: Sequence[Tensor], *, t: float, base: Tensor) -> Tensor:
    other = models[0]
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


QUANTILE_SAMPLE = 1_000_000  # beyond this many scores mergekit estimates the quantiles from this many draws


def outlier_threshold(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Median + 1.5 x the interquartile range of the scores, quartiles taken without interpolation."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()  # float32, as mergekit rounds
    q1, median, q3 = ordered[positions.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


@method(
    name="arcee_fusion",
    summary="Keeps the model's changes only where their size times the row's KL divergence from the base is an "
            "outlier (above the median + 1.5 IQR).",
    paper="Arcee Fusion (arcee.ai); mergekit 'arcee_fusion'",
    when="Take only a fine-tune's most salient changes into its base.",
    base=REQUIRED,
    min_models=1,
    max_models=1,
    scope=WHOLE,
    compute=PROMOTED,
    output=PROMOTED,
    random=True,
    properties=[IDENTITY],
)
def arcee_fusion(models: Sequence[Tensor], *, base: Tensor, generator: torch.Generator) -> Tensor:
    x = models[0]
    if x.numel() == 0:
        return x
    p = x.softmax(-1)
    p += 1e-8
    divergence = base.softmax(-1)
    divergence += 1e-8
    torch.div(p, divergence, out=divergence)
    divergence.log_()
    divergence *= p
    importance = (x - base).abs()
    importance *= row_sums(divergence)
    del p, divergence
    threshold = outlier_threshold(importance, generator)
    # The 0/1 mask is float32, so the sum is too (float64 for float64 inputs): mergekit's values, whatever
    # the input dtype; the output dtype rounds them once.
    old, new, scores = base.reshape(-1), x.reshape(-1), importance.reshape(-1)
    out = torch.empty(old.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for start, stop in chunk_ranges(out.numel()):
        mask = (scores[start:stop] >= threshold).float()
        torch.add(old[start:stop], (new[start:stop] - old[start:stop]) * mask, out=out[start:stop])
    return out.reshape(x.shape)
