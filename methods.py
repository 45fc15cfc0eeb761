"""The catalogue of merge methods: pure tensor math, each method declared once.

A method is a small pure function of the models' tensors (one output tensor's worth, already in the
compute dtype) and keyword parameters. Per-model parameters arrive as one value per model, shared ones
as one value. The `@method` declaration beside it says everything else the tool needs: parameters with
defaults and ranges, base policy, model counts, scope, compute and output dtypes, and the properties
the tests may assert. CLI flags, `--help`, validation and the README table all come from here.

This module imports only torch, numpy (DELLA sorts rows with it) and the standard library. It never opens
files or prints; a method signals a questionable input with `warnings.warn(MethodWarning(...))`, which the
caller reports.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
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

# Compute dtype rules (what the inputs are cast to before the method sees them). A plain dtype name
# ("float32", "bfloat16", ...) is a rule too: always that dtype.
FLOAT32 = "float32, or float64 when any input is float64"
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
    required: bool = False  # mergekit requires it in recipes; the CLI falls back to `default`

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
    check: Callable[[dict, int], list[tuple[str, str]]] | None  # (params, model count) -> [(param name, problem)]
    when: str  # one line on when to use it, for the README
    random: bool  # takes a keyword `generator`: a torch.Generator seeded for this tensor
    fallback: Callable[..., Tensor] | None  # MATRIX scope: the element-wise function for other tensors
    seed_keys: bool  # writes the SafeTensor Model Merger's metadata keys
    donor: str | None  # a parameter (1-based model index) naming the model that gives files and non-float tensors
    base_note: str  # appended to the error for a refused --base: what to use instead
    # MATRIX scope: why a 2-D tensor of this shape, with this many models, must take the fallback (or None)
    matrix_check: Callable[[tuple[int, ...], int, dict], str | None] | None = None
    too_few_hint: str = ""  # appended to the error when fewer than min_models models are given
    mergekit_variant: bool = False  # mergekit's semantics of a name whose default semantics differ (MERGEKIT_VARIANTS)
    ignores: dict[str, str] = field(default_factory=dict)  # recipe keys accepted with a warning: key -> why

    @property
    def uses_base(self) -> bool:
        return self.base in (REQUIRED, OPTIONAL)

    def param(self, name: str) -> Param | None:
        """The parameter called `name` (its Python name or its recipe key)."""
        return next((p for p in self.params if name in (p.name, p.key)), None)

    def compute_rule(self, params: dict) -> str:
        return self.compute(params) if callable(self.compute) else self.compute

    def problems(self, params: dict, count: int) -> list[tuple[str, str]]:
        """Cross-parameter problems for `count` models (besides a base); the check may also warn."""
        try:
            return self.check(params, count) if self.check else []
        except OverflowError:  # math.fsum of values near the float limit: no weighting can mean that
            name = next((p.name for p in self.params if p.per_model), self.params[0].name)
            return [(name, "are too large: their sum overflows")]

    def matrix_problem(self, shape: tuple[int, ...], count: int, params: dict) -> str | None:
        return self.matrix_check(shape, count, params) if self.matrix_check else None


REGISTRY: dict[str, Method] = {}

# mergekit's semantics of a registered name, where ours differ (karcher: the seed script's weighted mean vs
# mergekit's equal-weight mean over the models and the base). Recipes always take the variant; the command
# line takes it when a --base is given.
MERGEKIT_VARIANTS: dict[str, Method] = {}


def method(*, name: str, summary: str, paper: str, when: str, params: Sequence[Param] = (),
           base: str = UNUSED, min_models: int = 1, max_models: int | None = None, scope: str = ELEMENTWISE,
           compute: str | Callable[[dict], str] = FLOAT32, output: str = FIRST,
           properties: Sequence[str] = (), check: Callable[..., list[tuple[str, str]]] | None = None,
           random: bool = False, fallback: Callable[..., Tensor] | None = None, seed_keys: bool = False,
           donor: str | None = None, base_note: str = "",
           matrix_check: Callable[[tuple[int, ...], int, dict], str | None] | None = None, too_few_hint: str = "",
           mergekit_variant: bool = False, ignores: dict[str, str] | None = None):
    """Declare and register a method; the function itself is returned unchanged.

    `min_models` and `max_models` count the models besides a REQUIRED or OPTIONAL base. A MATRIX method
    names its `fallback`, an element-wise function with the same signature, and may name a `matrix_check`
    that sends a 2-D tensor to the fallback (with a warning) when the matrix math cannot apply to it.
    `check(params)` or `check(params, count)` returns cross-parameter problems, and may warn with MethodWarning.
    `mergekit_variant` declares mergekit's semantics of an already registered name (see MERGEKIT_VARIANTS).
    `ignores` names recipe parameters that mergekit accepts and ignores: they warn instead of failing.
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
        if (scope == MATRIX) != (fallback is not None) or (matrix_check and scope != MATRIX):
            raise TypeError(f"method {name}: a fallback and a matrix check go with the matrix scope, and only with it")
        if random and scope == ELEMENTWISE:
            raise TypeError(f"method {name}: random draws must not depend on chunking; use the whole-tensor scope")
        checker = check
        if check is not None and check.__code__.co_argcount == 1:  # a check that needs no model count
            checker = lambda params, count: check(params)  # noqa: E731
        if mergekit_variant and name not in REGISTRY:
            raise TypeError(f"method {name}: declare the default semantics before mergekit's variant")
        table = MERGEKIT_VARIANTS if mergekit_variant else REGISTRY
        table[name] = Method(name, func, summary, paper, tuple(params), base, min_models, max_models, scope,
                             compute, output, frozenset(properties), checker, when, random, fallback, seed_keys,
                             donor, base_note, matrix_check, too_few_hint, mergekit_variant, ignores or {})
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


def task_vectors(models: Sequence[Tensor], base: Tensor) -> Iterator[Tensor]:
    """Δ_i = θ_i − θ_0 in the compute dtype, one at a time: each is freed before the next is made."""
    return (x - base for x in models)


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


MEAN_OF_HOLDERS, ZEROS = -1, -2  # row sources in align_vocabulary, besides a model index


def align_vocabulary(tensors: Sequence[Tensor], index: Tensor, fallback: Tensor, fallback_rows: Tensor,
                     forced: Tensor, rows: int) -> list[Tensor]:
    """Each model's token rows re-indexed to a shared vocabulary (token axis first).

    index[i, r] is model i's row for output token r, or -1 where it lacks the token. A model that lacks
    a token, or every model where forced[r], gets the token's fallback row: model k's row
    fallback_rows[r] (fallback[r] = k), the mean of the rows of the models that have it
    (MEAN_OF_HOLDERS), or zeros (ZEROS). Rows past the vocabulary, up to `rows`, are padding: the mean of
    that model's real rows.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]
    vocab = index.shape[1]
    present = index >= 0
    default = torch.zeros((vocab, *tensors[0].shape[1:]), dtype=dtype, device=tensors[0].device)
    for k, tensor in enumerate(tensors):
        chosen = fallback == k
        default[chosen] = tensor[fallback_rows[chosen]]
    averaged = fallback == MEAN_OF_HOLDERS
    if averaged.any():
        total = torch.zeros_like(default[averaged])
        for tensor, row, has in zip(tensors, index, present):
            mask = has[averaged]
            total[mask] += tensor[row[averaged][mask]]
        count = present[:, averaged].sum(dim=0).clamp(min=1).to(dtype)
        default[averaged] = total / count.reshape(-1, *[1] * (total.ndim - 1))
    aligned = []
    for tensor, row, has in zip(tensors, index, present):
        own = has & ~forced
        out = torch.empty((rows, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
        out[:vocab] = default
        out[:vocab][own] = tensor[row[own]]
        if rows > vocab:
            out[vocab:] = out[:vocab].mean(dim=0)
        aligned.append(out)
    return aligned


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
    params=[Param("weight", default=equal, per_model=True, flag="--weights", aliases=("--alphas",), required=True,
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
    return karcher_gram(models, alphas, max_iter, tol)


def karcher_gram(models: Sequence[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    """The Karcher mean from one Gram pass and one output pass (coefficient space, float64 scalars)."""
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
    # The iteration's element-wise steps run chunk by chunk, in place: the same operations on every
    # element, so the same bits, at a quarter of the time (half-precision temporaries stay in cache);
    # the dot products and norms stay whole-tensor reductions, as the reference's bits depend on them.
    point = point.reshape(-1)
    tangent = torch.empty_like(point)
    for _ in range(max_iter):
        tangent.zero_()
        for beta, unit in zip(betas, (direction.reshape(-1) for direction in directions)):
            cosine = torch.clamp(torch.dot(point, unit), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            factor = beta * (theta / torch.sin(theta))
            materialized(tangent, lambda c, o: o.add_(factor * (unit[c] - cosine * point[c])))
        size = torch.linalg.vector_norm(tangent.to(wide))
        if size.item() < tol:
            break
        along, across = torch.cos(size), torch.sin(size)
        materialized(point, lambda c, o: o.copy_(along * o + across * (tangent[c] / size)))
        length = torch.linalg.vector_norm(point.to(wide))
        if length.item() > tol:
            materialized(point, lambda c, o: o.copy_(o / length))
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return (scale * point).reshape(models[0].shape)


# ---------------------------------------------------------------------------------------------------
# YOYO-Fusion: robust subspace merge (andehury/YOYO-Fusion v1.0), in the Gram-matrix form
#
# The reference stacks the K unit-RMS residuals as a D x K float64 matrix and takes its SVD. Every
# quantity it uses is a function of the K x K Gram matrix of the residuals, so this implementation
# keeps only that: a few passes over the tensors, chunk by chunk, build K x K float64 matrices; the
# eigen-decomposition, Weiszfeld iteration and Tukey weights work on K coefficients; one last pass
# writes the output. Memory stays at the inputs, the output and chunk-sized temporaries.

YOYO_EPS = 1e-8  # the reference's one epsilon, in every place it uses one
TUKEY_C = 4.685  # Tukey biweight tuning constant (95% efficiency under normal noise)
MAD_TO_SIGMA = 1.4826  # scales a median absolute value to a normal standard deviation
WEISZFELD_UPDATES = 100
WEISZFELD_TOL = 1e-6  # absolute distance between two iterates that stops Weiszfeld
NULL_RESIDUAL = 1e-7  # the largest residual norm below which the models count as identical
NULL_COMPONENT = 1e-7  # singular values below this fraction of the largest are rounding noise
MAX_ENERGY_SCALE = 10.0


def yoyo_check(params: dict, count: int) -> list[tuple[str, str]]:
    problems = []
    anchor, config_from = params["anchor"], params["config_from"]
    if anchor != int(anchor) or not 0 <= anchor <= count:
        problems.append(("anchor", f"must be 0 (none) or 1..{count} (got {anchor:g})"))
    if config_from != int(config_from) or not 1 <= config_from <= count:
        problems.append(("config_from", f"must be 1..{count} (got {config_from:g})"))
    if problems or not anchor:
        return problems
    if count == 2:
        warnings.warn(MethodWarning("yoyo-anchor-two", f"--anchor {anchor:g} with 2 models merges nothing: the other "
                                    f"model's residual gets weight 0, so the output is model {anchor:g}'s direction "
                                    f"at the mean norm of the two"))
    if params["median"] != "coordinate" or params["median_rule"] != "lower":
        warnings.warn(MethodWarning("yoyo-ignored", "--median and --median-rule are ignored with --anchor "
                                    "(the anchor model is the centre)"))
    return problems


@method(
    name="yoyo_fusion",
    summary="Robust subspace merge: unit-RMS models, a median centre, Tukey-weighted residuals on the top "
            "K-1 directions, the mean norm restored.",
    paper="YOYO-Fusion v1.0 (andehury/YOYO-Fusion)",
    when="Merge several fine-tunes of one base without a base model, damping the one that strays furthest.",
    min_models=2,
    scope=WHOLE,
    base=REFUSED,
    base_note="use --anchor to pick a reference model",
    donor="config_from",
    compute="float32",
    output="bfloat16",  # the reference writes bfloat16
    params=[
        Param("anchor", default=0, kind=int,
              help="0: the centre is a median of the models; n: model n (1-based) is the centre"),
        Param("median", default="coordinate", kind=str, choices=("geometric", "coordinate"),
              help="the centre without an anchor: element-wise median, or Weiszfeld's geometric median "
                   "started from it (the reference's README example uses geometric)"),
        Param("k_minus_one", default=True, kind=bool,
              help="keep the top K-1 residual directions and scale by the energy lost (at most 10x); "
                   "--no-k-minus-one keeps all K, unscaled"),
        Param("config_from", default=1, kind=int,
              help="model (1-based) whose config, tokenizer files and non-float tensors are copied"),
        Param("median_rule", default="lower", kind=str, choices=("lower", "standard"),
              help="even model counts: lower takes the smaller middle value (v1.0), standard the mean of "
                   "the two (v1.1)"),
    ],
    check=yoyo_check,
    properties=[IDENTITY],
)
def yoyo_fusion(models: Sequence[Tensor], *, anchor: int, median: str, k_minus_one: bool, config_from: int,
                median_rule: str) -> Tensor:
    """`config_from` picks the donor model, which the orchestrator handles; the math does not use it."""
    flats = [x.reshape(-1) for x in models]
    count, numel = len(flats), flats[0].numel()
    if numel == 0:
        return torch.empty_like(models[0])
    chunks = list(chunk_ranges(numel, yoyo_chunk(count, flats[0].device)))

    squares = torch.zeros(count, dtype=torch.float64)
    for start, stop in chunks:
        rows = torch.stack([f[start:stop] for f in flats]).to(torch.float64)
        squares += (rows * rows).sum(dim=1).cpu()
    norms = squares.sqrt()
    rms = (squares / (numel + 1e-12) + YOYO_EPS).sqrt().clamp(min=1e-6)
    divisors = (rms + YOYO_EPS).to(device=flats[0].device, dtype=flats[0].dtype).unsqueeze(1)

    def units(start: int, stop: int) -> Tensor:
        """u_i = x_i / (rms_i + eps) for one chunk, divided in the compute dtype as the reference does."""
        return (torch.stack([f[start:stop] for f in flats]) / divisors).to(torch.float64)

    def median_centre(u: Tensor) -> Tensor:
        return coordinate_median(u, median_rule)

    geometric = None  # the geometric median's coefficients over the u_i, unless it stays at its start
    if not anchor and median == "geometric":
        geometric = weiszfeld_coefficients(residual_gram(units, median_centre, chunks)[0])
        geometric = None if geometric is None else geometric.to(flats[0].device)

    def centre(u: Tensor) -> Tensor:
        if anchor:
            return u[anchor - 1]
        return median_centre(u) if geometric is None else geometric @ u

    gram, centre_dots, centre_square = residual_gram(units, centre, chunks)
    mix = subspace_coefficients(gram, numel, k_minus_one)
    # |y'|^2 for y' = M + sum_i b_i R_i, from the inner products of the pass that built the Gram matrix.
    length = math.sqrt(max(centre_square + 2 * float(mix @ centre_dots) + float(mix @ gram @ mix), 0.0))
    mean_rms, mean_norm = float(rms.mean()), float(norms.mean())
    factor = mean_rms * mean_norm / (mean_rms * length + YOYO_EPS)

    # y' = M + sum_i b_i (u_i - M) = (1 - sum_i b_i) M + sum_i b_i u_i, scaled, in one fused operation.
    keep = factor * (1.0 - float(mix.sum()))
    mix = mix.to(flats[0].device)
    out = torch.empty_like(flats[0])
    for start, stop in chunks:
        u = units(start, stop)
        out[start:stop] = torch.addmv(centre(u), u.T, mix, beta=keep, alpha=factor)
    return out.reshape(models[0].shape)


def yoyo_chunk(count: int, device: torch.device) -> int:
    """Elements per model per chunk: cache-sized on CPU; on a GPU larger, to amortise kernel launches."""
    return max(1 << 12, (CHUNK if device.type == "cpu" else CHUNK << 4) // count)


def coordinate_median(rows: Tensor, rule: str) -> Tensor:
    """Element-wise median over the models: the lower middle value, or the mean of the two middles."""
    ordered = sorted_rows(rows)
    middle = (len(ordered) - 1) // 2
    if rule == "lower" or len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle] + ordered[middle + 1]) / 2


def sorted_rows(rows: Tensor) -> list[Tensor]:
    """The rows sorted element by element, by odd-even transposition (a sorting network).

    K rounds of element-wise min/max: for the few models of a merge this is 10-100x faster than
    torch.sort or torch.median along a short dimension, with the same values.
    """
    ordered = list(rows)
    for round_ in range(len(ordered)):
        for i in range(round_ % 2, len(ordered) - 1, 2):
            low, high = ordered[i], ordered[i + 1]
            ordered[i], ordered[i + 1] = torch.minimum(low, high), torch.maximum(low, high)
    return ordered


def residual_gram(units: Callable[[int, int], Tensor], centre: Callable[[Tensor], Tensor],
                  chunks: list[tuple[int, int]]) -> tuple[Tensor, Tensor, float]:
    """G = R R^T of the residuals R_i = u_i - M, <M, R_i> and |M|^2, in float64 from explicit residuals.

    Explicit residuals, not U U^T minus the centre's terms: the subtraction would cancel away the exact
    zeros that the identical-models test relies on.
    """
    gram = centre_dots = None
    centre_square = 0.0
    for start, stop in chunks:
        u = units(start, stop)
        m = centre(u)
        residuals = u - m
        part, dots = residuals @ residuals.T, residuals @ m
        gram = part if gram is None else gram + part
        centre_dots = dots if centre_dots is None else centre_dots + dots
        centre_square += float(m @ m)
    return gram.cpu(), centre_dots.cpu(), centre_square


def weiszfeld_coefficients(start_gram: Tensor) -> Tensor | None:
    """Weiszfeld's geometric median as coefficients a (M = sum_i a_i u_i), or None when it stops at its start.

    `start_gram` is the Gram matrix of u_i - y0, y0 the start. Since the weights sum to 1, every
    distance is a quadratic form of it: |u_i - sum_j a_j u_j|^2 = G_ii - 2 (G a)_i + a^T G a, and the
    step between iterates a and w is (w - a)^T G (w - a). The reference stops when a step is shorter than
    1e-6 and returns the iterate before that step; otherwise the 100th update.
    """
    diagonal = start_gram.diagonal()

    def weights(squared_distances: Tensor) -> Tensor:
        inverse = 1.0 / (squared_distances.clamp(min=0).sqrt() + YOYO_EPS)
        return inverse / inverse.sum()

    current = weights(diagonal)
    if float(current @ start_gram @ current) < WEISZFELD_TOL**2:
        return None
    for _ in range(WEISZFELD_UPDATES - 1):
        pulled = start_gram @ current
        following = weights(diagonal - 2 * pulled + current @ pulled)
        step = following - current
        if float(step @ start_gram @ step) < WEISZFELD_TOL**2:
            break
        current = following
    return current


def subspace_coefficients(gram: Tensor, numel: int, k_minus_one: bool) -> Tensor:
    """b with y' = M + sum_i b_i R_i: the Tukey-weighted residual in the top singular directions.

    The reference's thin SVD R^T = P S Q^T has R P_m = Q_m S_m, so its coordinates Z, their robust mean z*
    and the step gamma P_m z* = R^T (gamma Q_m S_m^-1 z*) all follow from the eigen-decomposition of G.
    """
    count = gram.shape[0]
    none = torch.zeros(count, dtype=torch.float64)
    if gram.diagonal().max().clamp(min=0).sqrt() < NULL_RESIDUAL:
        return none
    eigenvalues, vectors = torch.linalg.eigh(gram)
    rank = min(numel, count)
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0)[:rank], vectors.flip(1)[:, :rank]
    energy = float(eigenvalues.sum())
    if energy < 1e-16:
        return none
    kept = min(count - 1, rank) if k_minus_one else rank  # >= 1 for K >= 2, D >= 1
    scale = 1.0
    if k_minus_one:
        retained = float(eigenvalues[:kept].sum()) / (energy + 1e-16)
        scale = min(1.0 / (retained + 1e-16), MAX_ENERGY_SCALE)  # 1/p, not its square root, as the reference
    singular = eigenvalues[:kept].sqrt()
    live = singular > NULL_COMPONENT * singular[0]
    singular, vectors = singular[live], vectors[:, :kept][:, live]
    coords = vectors * singular  # K x m: each model's residual in the kept directions
    return scale * vectors @ (tukey_mean(coords) / singular)


def tukey_mean(coords: Tensor) -> Tensor:
    """One pass of Tukey biweights per coordinate and per model (by its residual's length); no reweighting.

    The scales are 1.4826 x the lower median of absolute values about 0, floored at 1e-12.
    """
    size = coords.abs()
    lengths = coords.norm(dim=1)
    spread = (MAD_TO_SIGMA * size.median(dim=0).values).clamp(min=1e-12)
    global_spread = max(MAD_TO_SIGMA * float(lengths.median()), 1e-12)
    per_coordinate = (1 - (size / (TUKEY_C * spread + YOYO_EPS)) ** 2).clamp(min=0) ** 2
    per_model = (1 - (lengths / (TUKEY_C * global_spread + YOYO_EPS)) ** 2).clamp(min=0) ** 2
    weights = per_coordinate * per_model.unsqueeze(1)
    return (weights * coords).sum(dim=0) / (weights.sum(dim=0) + YOYO_EPS)


# methods beyond mergekit: TSV-M, Iso-C, Iso-CTS and CART work on the singular vectors of each weight
# matrix (../shared/spec/new-methods.md); MagMax keeps the largest task delta of each element


SVD_SOLVERS = ("exact", "lowrank", "gram")
# rank_guard: singular values of a stacked factor below this fraction of its largest are dropped (§1)
POLAR_CUTOFF = 1e-6
LOWRANK_OVERSAMPLING = 16  # sketch columns beyond the k wanted: q = k + 16
LOWRANK_POWER_STEPS = 2


def numerical_rank(s: Tensor, shape: Sequence[int], scale: float | None = None) -> int:
    """r* = #{j : s_j > max(m, n)·eps·scale}; scale is s_1 unless given."""
    if s.numel() == 0:
        return 0
    reference = float(s[0]) if scale is None else scale
    return int((s > max(shape) * torch.finfo(s.dtype).eps * reference).sum())


def wider(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: LAPACK has no half-precision SVD, and --compute-dtype may ask for one."""
    return torch.promote_types(dtype, torch.float32)


def singular_triplets(matrix: Tensor, solver: str, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD (U, s, Vᵀ), s descending, or its `top` leading triplets.

    `lowrank` is used only for a top-k request whose sketch is smaller than the matrix; `gram` returns
    only the numerically non-zero triplets (it has no vectors for the others).
    """
    wide = matrix.to(wider(matrix.dtype))
    if solver == "lowrank" and top is not None and top + LOWRANK_OVERSAMPLING < min(matrix.shape):
        return randomized_svd(wide, top)
    u, s, vh = gram_svd(wide) if solver == "gram" else thin_svd(wide)
    if top is None:
        return u, s, vh
    # copies, so that the full factors are freed before the next model's SVD
    return u[:, :top].clone(), s[:top].clone(), vh[:top].clone()


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False), again in float64 when LAPACK does not converge.

    Multithreaded float32 gesdd fails now and then on matrices that converge on one thread or in float64
    (seen on a 1024 x 2816 stack of Iso-CTS's right singular vectors, condition number ~3).
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise ValueError(f"the SVD of a {tuple(matrix.shape)} matrix did not converge") from None
    try:
        return tuple(f.to(matrix.dtype) for f in torch.linalg.svd(matrix.double(), full_matrices=False))
    except torch.linalg.LinAlgError:
        raise ValueError(f"the SVD of a {tuple(matrix.shape)} matrix did not converge, even in float64") from None


def gram_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD from an `eigh` of the smaller Gram matrix, numerically non-zero triplets only.

    Several times faster than LAPACK's SVD (0.14 s against 0.55 s for 1024 x 2816 here), but it squares
    the condition number: well-conditioned input only.
    """
    tall = matrix.shape[0] >= matrix.shape[1]
    a = matrix if tall else matrix.T
    eigenvalues, v = torch.linalg.eigh(a.T @ a)
    eigenvalues, v = eigenvalues.flip(0), v.flip(1)
    kept = numerical_rank(eigenvalues, a.shape)
    s = eigenvalues[:kept].sqrt()
    v = v[:, :kept]
    u = (a @ v) / s
    return (u, s, v.T) if tall else (v, s, u.T)


def randomized_svd(matrix: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The leading `top` triplets by a randomized range finder (torch.svd_lowrank's algorithm).

    The sketch comes from a generator of its own with a fixed seed, so a merge repeats bit for bit and
    never touches torch's global random state.
    """
    sketch = torch.randn(matrix.shape[1], top + LOWRANK_OVERSAMPLING, dtype=matrix.dtype,
                         generator=torch.Generator().manual_seed(0)).to(matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(LOWRANK_POWER_STEPS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = thin_svd(basis.T @ matrix)
    return basis @ u[:, :top], s[:top].clone(), vh[:top].clone()


def polar(matrix: Tensor, solver: str, rank_guard: bool) -> tuple[Tensor, Tensor]:
    """polar(A) = P·Qᵀ from A = P·Σ·Qᵀ, and Σ; with rank_guard only the directions with σ > 1e-6·σ_max."""
    p, s, qh = singular_triplets(matrix, solver)
    if rank_guard:
        kept = int((s > POLAR_CUTOFF * s[0]).sum()) if s.numel() else 0
        p, qh = p[:, :kept], qh[:kept]
    return p @ qh, s


def leading_triplets(matrix: Tensor, solver: str, top: int | None, rank_guard: bool,
                     scale: float | None = None) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """The `top` leading triplets (all when None), cut to the numerical rank under rank_guard, and whether
    that rank (counted against `scale`, else s_1) falls short of them."""
    u, s, vh = singular_triplets(matrix, solver, top)
    rank = numerical_rank(s, matrix.shape, scale)
    if rank_guard:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    return (u, s, vh), rank < (min(matrix.shape) if top is None else top)


def orthogonalised_stack(blocks: Sequence[tuple[Tensor, Tensor, Tensor]], solver: str, rank_guard: bool,
                         deficient: bool, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """polar(Û), ŝ and polar(V̂ᵀ) of triplet blocks stacked in order (TSV-M step 5, Iso-CTS step 6).

    Without rank_guard an ill-posed stack warns: numerically zero triplets in a block (`deficient`, in
    `what`), or blocks whose directions are nearly linearly dependent.
    """
    lefts, strengths, rights = zip(*blocks)
    left, right = torch.cat(lefts, dim=1), torch.cat(rights)
    strengths = torch.cat(strengths)
    left_factor, left_s = polar(left, solver, rank_guard)
    right_factor, right_s = polar(right, solver, rank_guard)
    if not rank_guard and strengths.any():
        if deficient:
            warn_rank_deficient(what)
        elif nearly_dependent(left_s, left.shape) or nearly_dependent(right_s, right.shape):
            warn_nearly_dependent()
    return left_factor, strengths, right_factor


def nearly_dependent(s: Tensor, shape: Sequence[int]) -> bool:
    """A stacked factor whose columns (or rows) are close to linearly dependent: σ_min/σ_max < 1e-6."""
    return s.numel() < min(shape) or bool(s[-1] < POLAR_CUTOFF * s[0])


def warn_rank_deficient(what: str) -> None:
    warnings.warn(MethodWarning("rank-deficient", f"{what} is numerically rank-deficient, so arbitrary singular "
                                                  "vectors enter the result (it depends on the LAPACK build); "
                                                  "--rank-guard drops them"))


def warn_nearly_dependent() -> None:
    warnings.warn(MethodWarning("near-duplicate", "the models' task directions are nearly linearly dependent "
                                                  "(duplicate or near-duplicate models?), so the result is "
                                                  "ill-posed; --rank-guard merges duplicates into one"))


def mean_task_vector(models: Sequence[Tensor], base: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    deltas = task_vectors(models, base)
    if weights is not None:
        deltas = (d * w for d, w in zip(deltas, weights))
    return sum(deltas) / len(models)


def svd_size_problem(shape: tuple[int, ...], count: int, params: dict) -> str | None:
    limit = params["svd_max_dim"]
    if max(shape) > limit:
        return f"{shape[0]} x {shape[1]} is larger than --svd-max-dim {limit}"
    return None


def lambda_param(default: float, note: str = "") -> Param:
    return Param("lambda_", default=default, low=0.0, help="scale of the merged task vector" + (note and f"; {note}"))


RANK_GUARD = Param("rank_guard", default=False, kind=bool,
                   help="drop numerically zero singular directions instead of orthogonalising or flattening them "
                        "(not in the papers; changes only rounding on well-posed inputs)")
SVD_SOLVER = Param("svd_solver", default="exact", kind=str, choices=SVD_SOLVERS,
                   help="exact: LAPACK SVD; lowrank: randomized SVD for the SVDs that keep only the top k "
                        "triplets; gram: eigh of the smaller Gram matrix (well-conditioned input only)")
SVD_MAX_DIM = Param("svd_max_dim", default=32768, kind=int, low=1,
                    help="matrices with a side longer than this take the fallback (with a warning)")


def tsv_m_matrix_problem(shape: tuple[int, ...], count: int, params: dict) -> str | None:
    if int(min(shape) * (1.0 / count)) == 0:
        return f"TSV-M keeps int(r/T) = 0 directions of a {shape[0]} x {shape[1]} matrix per model ({count} models)"
    return svd_size_problem(shape, count, params)


def tsv_m_fallback(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], lambda_: float,
                   rank_guard: bool, svd_solver: str, svd_max_dim: int) -> Tensor:
    """θ₀ + λ·mean(w_i·Δ_i)"""
    return base + lambda_ * mean_task_vector(models, base, weight)


@method(
    name="tsv_m",
    summary="Keep each model's top 1/T singular directions of every weight matrix and orthogonalise them "
            "across models (Task Singular Vectors: Merge).",
    paper="Task Singular Vectors, CVPR 2025, arXiv 2412.00081",
    when="Merge several fine-tunes of one base whose tasks interfere; the best published data-free LLM result "
         "after WUDI. T SVDs per matrix: slow on CPU, use --device cuda or --svd-solver lowrank.",
    params=[lambda_param(1.0),
            Param("weight", default=1.0, per_model=True, flag="--weights", aliases=("--alphas",),
                  help="scales each task vector before the SVD and in the fallback"),
            RANK_GUARD, SVD_SOLVER, SVD_MAX_DIM],
    base=REQUIRED, min_models=2, scope=MATRIX, fallback=tsv_m_fallback, matrix_check=tsv_m_matrix_problem,
    output=BASE, properties=[ORDER_FREE, HOMOGENEOUS],
)
def tsv_m(models: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], lambda_: float, rank_guard: bool,
          svd_solver: str, svd_max_dim: int) -> Tensor:
    per_model = int(min(base.shape) * (1.0 / len(models)))  # the reference's float arithmetic, for parity
    blocks, deficient = [], False
    for w, delta in zip(weight, task_vectors(models, base)):
        block, short = leading_triplets(delta * w, svd_solver, per_model, rank_guard)
        blocks.append(block)
        deficient |= short
    # The orthogonal factors nearest to the stacked directions: tasks stop interfering.
    left, strengths, right = orthogonalised_stack(blocks, svd_solver, rank_guard, deficient, "a task vector")
    return base + lambda_ * ((left * strengths) @ right)


# FusionBench's default; the paper tunes it on validation data (../shared/spec/decisions.md §11)
ISO_LAMBDA_NOTE = "the paper's published ViT results use 1.5"


def iso_c_fallback(models: Sequence[Tensor], *, base: Tensor, lambda_: float, rank_guard: bool, svd_solver: str,
                   svd_max_dim: int) -> Tensor:
    """θ₀ + λ·mean(Δ_i)"""
    return base + lambda_ * mean_task_vector(models, base)


def no_lowrank_solver(params: dict) -> list[tuple[str, str]]:
    if params["svd_solver"] == "lowrank":
        return [("svd_solver", "lowrank does not apply: iso_c needs the whole spectrum (use exact or gram)")]
    return []


@method(
    name="iso_c",
    summary="Sum the task vectors, then give every singular direction of each weight matrix the same "
            "strength (isotropic merging in the common subspace).",
    paper="Iso-C, No Task Left Behind, ICML 2025, arXiv 2502.04959",
    when="Merge fine-tunes whose summed update is dominated by a few directions; one SVD per matrix. "
         "The paper tunes --lambda on validation data (1.5 in its ViT results).",
    params=[lambda_param(1.0, ISO_LAMBDA_NOTE), RANK_GUARD, SVD_SOLVER,
            SVD_MAX_DIM],
    base=REQUIRED, min_models=2, scope=MATRIX, fallback=iso_c_fallback, matrix_check=svd_size_problem,
    check=no_lowrank_solver, output=BASE, properties=[ORDER_FREE, HOMOGENEOUS],
)
def iso_c(models: Sequence[Tensor], *, base: Tensor, lambda_: float, rank_guard: bool, svd_solver: str,
          svd_max_dim: int) -> Tensor:
    total = sum(task_vectors(models, base))  # the sum, not the mean
    (u, s, vh), deficient = leading_triplets(total, svd_solver, None, rank_guard)
    if deficient and not rank_guard and s.any():
        warn_rank_deficient("the sum of the task vectors")
    directions = max(s.numel(), 1) if rank_guard else min(base.shape)
    # A flat spectrum with the same nuclear norm: the few dominant directions no longer drown the rest.
    return base + lambda_ * ((s.sum() / directions) * (u @ vh))


def iso_cts_split(rank: int, count: int, fraction: float) -> tuple[int, int]:
    """(k_c, d): common directions, and directions of each model's own subspace (§3 step 2)."""
    task_total = round((rank - int(rank * fraction)) / count) * count  # round half to even, as the reference
    if task_total > rank:
        task_total -= count
    return rank - task_total, task_total // count


def iso_cts_fallback(models: Sequence[Tensor], *, base: Tensor, lambda_: float, common_space_fraction: float,
                     rank_guard: bool, svd_solver: str, svd_max_dim: int) -> Tensor:
    """θ₀ + λ·mean(Δ_i)"""
    return base + lambda_ * mean_task_vector(models, base)


@method(
    name="iso_cts",
    summary="Iso-C on the common subspace of the summed task vectors, with its weakest directions replaced "
            "by each model's strongest directions outside it.",
    paper="Iso-CTS, No Task Left Behind, ICML 2025, arXiv 2502.04959",
    when="Like iso_c, when some models' tasks are under-represented in the sum (many or dissimilar tasks); "
         "T + 3 SVDs per matrix.",
    params=[lambda_param(1.0, ISO_LAMBDA_NOTE),
            Param("common_space_fraction", default=0.8, low=0.0, high=1.0, low_open=True,
                  help="share of the directions taken from the common subspace"),
            RANK_GUARD, SVD_SOLVER, SVD_MAX_DIM],
    base=REQUIRED, min_models=2, scope=MATRIX, fallback=iso_cts_fallback, matrix_check=svd_size_problem,
    output=BASE, properties=[ORDER_FREE, HOMOGENEOUS],
)
def iso_cts(models: Sequence[Tensor], *, base: Tensor, lambda_: float, common_space_fraction: float,
            rank_guard: bool, svd_solver: str, svd_max_dim: int) -> Tensor:
    common, per_model = iso_cts_split(min(base.shape), len(models), common_space_fraction)
    common_block, deficient = leading_triplets(sum(task_vectors(models, base)), svd_solver, common, rank_guard)
    common_u = common_block[0]
    blocks = []
    for delta in task_vectors(models, base) if per_model else ():
        outside = delta - common_u @ (common_u.T @ delta.to(common_u.dtype))
        # Rank against Δ_i's size: the projection leaves rounding noise of that size, not of the remainder's.
        block, short = leading_triplets(outside, svd_solver, per_model, rank_guard,
                                        float(torch.linalg.vector_norm(delta)))
        blocks.append(block)
        deficient |= short
    left, strengths, right = orthogonalised_stack(
        blocks + [common_block], svd_solver, rank_guard, deficient,
        "the sum of the task vectors or a task vector outside the common subspace")
    entries = max(strengths.numel(), 1) if rank_guard else min(base.shape)
    return base + lambda_ * ((strengths.sum() / entries) * (left @ right))


def cart_fallback(models: Sequence[Tensor], *, lambda_: float, rank_ratio: float, svd_solver: str,
                  svd_max_dim: int) -> Tensor:
    """the plain average"""
    return sum(models) / len(models)


@method(
    name="cart",
    summary="The plain average plus λ times a low-rank version of each model's deviation from it "
            "(centred arithmetic with rank-reduced task vectors); needs no base.",
    paper="CART, Revisiting Weight Averaging for Model Merging, arXiv 2412.12153",
    when="Merge 3 or more fine-tunes when no base model is at hand; T SVDs per matrix (--svd-solver lowrank "
         "pays off at the default rank ratio).",
    params=[lambda_param(2.0, "the reference's setting for 8 tasks (1.5 for 14, 1.9 for 20)"),
            Param("rank_ratio", default=0.12, low=0.0, high=1.0,
                  help="share of each deviation's singular directions kept; the reference's setting for 8 tasks "
                       "(0.16 for 14, 0.32 for 20)"),
            SVD_SOLVER, SVD_MAX_DIM],
    min_models=3, too_few_hint="with 2 models CART is exactly their average: use --method linear",
    scope=MATRIX, fallback=cart_fallback, matrix_check=svd_size_problem,
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def cart(models: Sequence[Tensor], *, lambda_: float, rank_ratio: float, svd_solver: str, svd_max_dim: int) -> Tensor:
    average = sum(models) / len(models)
    directions = min(average.shape)
    kept = 0 if rank_ratio == 0 else directions if rank_ratio == 1 else max(1, int(rank_ratio * directions))
    if kept == 0:
        return average
    low_rank = torch.zeros_like(average, dtype=wider(average.dtype))
    for x in models:
        u, s, vh = singular_triplets(x - average, svd_solver, kept)
        low_rank.addmm_(u * s, vh)
    return average + lambda_ * low_rank


@method(
    name="magmax",
    summary="For each element, keep the task delta of largest magnitude (the later model wins a tie).",
    paper="MagMax, ECCV 2024, arXiv 2407.06322",
    when="Merge fine-tunes whose useful updates are large and sparse, e.g. a sequence of tasks; element-wise, "
         "as fast as a plain average.",
    params=[lambda_param(0.5, "the reference's 8-task setting")],
    base=REQUIRED, min_models=2, output=BASE, properties=[HOMOGENEOUS],
)
def magmax(models: Sequence[Tensor], *, base: Tensor, lambda_: float) -> Tensor:
    selected = models[0] - base
    largest = selected.abs()
    for delta in task_vectors(models[1:], base):
        size = delta.abs()
        selected = select(size >= largest, delta, selected)  # >=: on a tie the later model wins
        largest = torch.maximum(largest, size)
    return base + lambda_ * selected


def integer_view(dtype: torch.dtype) -> torch.dtype:
    """The signed integer dtype of the same width as a float dtype, to reinterpret its bits."""
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]


def select(mask: Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    """torch.where(mask, if_true, if_false), bit for bit, by masking the integer views of the floats.

    torch.where's CPU kernel took 8 ms per 2^18 float32 elements here, these three integer passes 1.3 ms.
    """
    kind = integer_view(if_true.dtype)
    true_bits, false_bits = if_true.view(kind), if_false.view(kind)
    flips = false_bits.bitwise_xor(true_bits).bitwise_and_(mask.to(kind).neg_())
    return flips.bitwise_xor_(false_bits).view(if_true.dtype)


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


def stacked_sum(terms: Iterable[Tensor], out: Tensor) -> Tensor:
    """torch.stack(terms).sum(0) into `out` without the stack, one term alive at a time: half precision
    adds up in float32 and rounds once, as torch's sum does. (The sum builds in a temporary: `out` is
    written once.)"""
    wide = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
    total = torch.zeros(out.shape, dtype=wide, device=out.device)
    for term in terms:
        total += term
    return out.copy_(total)


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
    params=[Param("t", required=True,
                  help="position from the base (0) to the model (1); several values form a per-layer gradient")],
    properties=[IDENTITY, HOMOGENEOUS],
)
def slerp(models: Sequence[Tensor], *, t: float, base: Tensor) -> Tensor:
    if not 0.0 <= t <= 1.0:
        warnings.warn(MethodWarning("extrapolate", f"t = {t:g} lies outside [0, 1], so slerp extrapolates"))
    # mergekit's slerp widens half-precision tensors itself (the orchestrator's FLOAT32 rule already has)
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


def materialized(buffer: Tensor, piece: Callable[[slice, Tensor], object]) -> Tensor:
    """`buffer` (flat) filled chunk by chunk, piece(chunk, buffer[chunk]) writing each: a whole-tensor
    intermediate that a reduction needs whole, made without whole-tensor temporaries (every element sees
    the same operations)."""
    for start, stop in chunk_ranges(buffer.numel()):
        piece(slice(start, stop), buffer[start:stop])
    return buffer


def by_rows(func: Callable[..., Tensor], tensors: Sequence[Tensor]) -> Tensor:
    """func(*blocks) over blocks of whole rows (of the last axis) of `tensors`, about a chunk each.

    For math in which each row stands alone this gives the bits of func on the whole tensors: every row
    is reduced by the same kernel whatever the rows around it, and every element sees the same operations.
    It only bounds the temporaries to a block.
    """
    shape = tensors[0].shape
    length = shape[-1] if len(shape) else 1
    if tensors[0].numel() == 0:
        return func(*tensors)
    rows = [t.reshape(-1, length) for t in tensors]
    out = None
    step = max(1, CHUNK // length)
    for start in range(0, rows[0].shape[0], step):
        block = func(*(r[start:start + step] for r in rows))
        if out is None:
            out = torch.empty(rows[0].shape, dtype=block.dtype, device=block.device)
        out[start:start + step] = block
    return out.reshape(shape)


def slerp_vectors(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """nuslerp's interpolation of v0 and v1 at t, one arc per row (last axis)."""
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
    return result


def slerp_flat(t: float, first: Tensor, second: Tensor, base: Tensor | None) -> Tensor:
    """slerp_vectors with one arc for the whole tensors (of their task vectors with a base, added back),
    chunk by chunk: the norms and the dot product are taken over whole vectors built in the output's
    buffer, so the only whole-tensor memory is the output."""
    flats = [x.reshape(-1) for x in (first, second)]
    origin = None if base is None else base.reshape(-1)
    out = torch.empty_like(flats[0])

    def vector(i: int) -> Callable[[slice], Tensor]:
        return (lambda c: flats[i][c]) if origin is None else (lambda c: flats[i][c] - origin[c])

    def whole(i: int) -> Tensor:
        return flats[i] if origin is None else materialized(out, lambda c, o: torch.sub(flats[i][c], origin[c], out=o))

    v0, v1 = vector(0), vector(1)
    n0, n1 = (torch.norm(whole(i), dim=-1, keepdim=True).clamp(min=1e-7) for i in (0, 1))
    cos = row_sums(materialized(out, lambda c, o: torch.mul(v0(c) / n0, v1(c) / n1, out=o))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    s0, s1, s = torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)

    def point(c: slice, o: Tensor) -> None:
        if colinear:
            result = (1 - t) * v0(c)
            result += t * v1(c)
        else:
            result = s0 * v0(c)
            result += s1 * v1(c)
            result /= s
        if origin is None:
            o.copy_(result)
        else:
            torch.add(origin[c], result, out=o)

    return materialized(out, point).reshape(first.shape)


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
    first, second = models
    if nuslerp_flatten or first.dim() == 0:
        return slerp_flat(t, first, second, base)

    def arcs(a: Tensor, b: Tensor, origin: Tensor | None = None) -> Tensor:
        return slerp_vectors(t, a, b) if origin is None else origin + slerp_vectors(t, a - origin, b - origin)

    inputs = [first, second] if base is None else [first, second, base]
    if nuslerp_row_wise:  # vectors along the first axis: the arcs of the transposed tensors, taken whole
        return arcs(*(x.transpose(0, -1) for x in inputs)).transpose(0, -1)
    return by_rows(arcs, inputs)


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
    flats = [x.reshape(-1) for x in models]
    origin = None if base is None else base.reshape(-1)
    weights = torch.tensor(weight, dtype=flats[0].dtype, device=flats[0].device)
    if normalize_weights:
        weights = weights / weights.sum()
    # Every whole-tensor intermediate is built in one of two buffers, a chunk at a time: the mean
    # direction, and the vector a reduction needs whole (a task vector, a product, the tangent).
    mean, scratch = torch.empty_like(flats[0]), torch.empty_like(flats[0])

    def vector(i: int, c: slice) -> Tensor:
        return flats[i][c] if origin is None else flats[i][c] - origin[c]

    norms = [torch.norm(flats[i] if origin is None
                        else materialized(scratch, lambda c, o: torch.sub(flats[i][c], origin[c], out=o)))
             for i in range(len(flats))]
    divisors = [n + eps for n in norms]

    def unit(i: int, c: slice) -> Tensor:
        return vector(i, c) / divisors[i]

    materialized(mean, lambda c, o: stacked_sum((unit(i, c) * w for i, w in enumerate(weights)), o))
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) > 2:
            raise ValueError("the weighted directions cancel out (the models, or their task vectors, are zero "
                             "or opposite with balancing weights)")
        # Two opposite directions: mergekit falls back to the straight line between the models.
        def line(c: slice, o: Tensor) -> None:
            result = vector(0, c) * weights[0] + vector(1, c) * weights[1]
            if origin is None:
                o.copy_(result)
            else:
                torch.add(result, origin[c], out=o)
        return materialized(mean, line).reshape(models[0].shape)
    mean /= mean_norm
    # each unit vector's projection onto the tangent plane at the mean
    dots = [row_sums(materialized(scratch, lambda c, o: torch.mul(unit(i, c), mean[c], out=o)))
            for i in range(len(flats))]

    def tangent(i: int, c: slice) -> Tensor:
        u = unit(i, c)
        u -= dots[i] * mean[c]
        return u

    materialized(scratch, lambda c, o: stacked_sum((tangent(i, c) * w for i, w in enumerate(weights)), o))
    size = torch.norm(scratch) + eps
    # the exponential map's step from the mean, in place
    along, across, scale = torch.cos(size), torch.sin(size) / size, (torch.stack(norms) * weights).sum()
    for start, stop in chunk_ranges(mean.numel()):
        result = mean[start:stop]
        result *= along
        result += scratch[start:stop] * across
        result *= scale
        if origin is not None:
            result += origin[start:stop]
    return mean.reshape(models[0].shape)


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
    ignores={"weight": "mergekit's karcher weighs every input equally"},
    properties=[IDENTITY, ORDER_FREE, HOMOGENEOUS],
)
def karcher_mergekit(models: Sequence[Tensor], *, max_iter: int, tol: float) -> Tensor:
    if len(models) == 1:
        return models[0]
    if models[0].dtype in (torch.float32, torch.float64):
        # The same iteration in coefficient space: mergekit's float32 values to ~1e-7 (its own float32
        # dot products vary with the thread count), 10x faster, and the same bits on any thread count.
        return karcher_gram(models, equal(len(models)), max_iter, tol)
    return karcher_direct(models, equal(len(models)), max_iter, tol)  # half precision: mergekit's bits


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
    if filter_wise:
        return by_rows(lambda origin, *points: stock_rows(origin, points), [base, *models])
    return stock_flat(base, models)


def stock_factor(norms: Sequence[Tensor], dots: dict[tuple[int, int], Tensor]) -> Tensor:
    """Model Stock's interpolation factor t from the task vectors' norms and pairwise dot products (one
    each per row, or one number each), with a trailing axis to broadcast over the rows."""
    cosines = [(dots[a, b] / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1) for a, b in dots]
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(norms)
    denominator = 1 + (count - 1) * cos_theta
    # Where the denominator vanishes there is no finite factor: keep the base there.
    singular = denominator.abs() < 1e-6
    denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / denominator)


def stock_point(points: Iterable[Tensor], origin: Tensor, t: Tensor, count: int, out: Tensor | None = None) -> Tensor:
    result = torch.div(sum(points), count, out=out)
    result *= t
    result += (1 - t) * origin
    return result


def pairs(count: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(count) for b in range(a + 1, count)]


def stock_rows(origin: Tensor, points: Sequence[Tensor]) -> Tensor:
    """model_stock with one factor per row of (rows, length) blocks."""
    # Task vectors are made again for each pair: memory for two of them, not for all.
    norms = [torch.norm(p - origin, dim=-1) for p in points]
    dots = {(a, b): row_sums((points[a] - origin) * (points[b] - origin)).squeeze(-1) for a, b in pairs(len(points))}
    return stock_point(points, origin, stock_factor(norms, dots), len(points))


def stock_flat(base: Tensor, models: Sequence[Tensor]) -> Tensor:
    """model_stock with one factor for the whole tensor: each norm and dot product is taken over a whole
    task vector or product built in the output's buffer, a chunk at a time."""
    origin, points = base.reshape(-1), [x.reshape(-1) for x in models]
    out = torch.empty_like(origin)

    def offset(i: int, c: slice) -> Tensor:
        return points[i][c] - origin[c]

    norms = [torch.norm(materialized(out, lambda c, o: torch.sub(points[i][c], origin[c], out=o)), dim=-1)
             for i in range(len(points))]
    dots = {(a, b): row_sums(materialized(out, lambda c, o: torch.mul(offset(a, c), offset(b, c), out=o))).squeeze(-1)
            for a, b in pairs(len(points))}
    t = stock_factor(norms, dots)
    return materialized(out, lambda c, o: stock_point((p[c] for p in points), origin[c], t, len(points), o)).reshape(
        base.shape)


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
    params=[Param("t", low=0.0, required=True, help="distance below which the model's value is taken whole")],
    properties=[IDENTITY],
)
def nearswap(models: Sequence[Tensor], *, t: float, base: Tensor) -> Tensor:
    other = models[0]
    # mergekit's (t / |base - other|.clamp(1e-6)).clamp(0, 1) and w·other + (1 − w)·base, op for op in place
    # (torch computes t / x as x.reciprocal() * t, and 1 − w as −w + 1, with the same roundings)
    weight = torch.sub(base, other).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
    taken = torch.mul(weight, other)
    return taken.add_(weight.neg_().add_(1).mul_(base))


QUANTILE_SAMPLE = 1_000_000  # beyond this many scores mergekit estimates the quantiles from this many draws


def outlier_threshold(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Median + 1.5 x the interquartile range of the scores, quartiles taken without interpolation."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        # index_select gathers what flat[draws] does, several times faster here
        flat = flat.index_select(0, torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device))
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()  # float32, as mergekit rounds
    q1, median, q3 = sorted_floats(flat, positions.to(flat.device))
    return median + 1.5 * (q3 - q1)


def sorted_floats(flat: Tensor, positions: Tensor) -> Tensor:
    """torch.sort(flat).values[positions], by a radix selection on integer keys: 4-6 ms here for 10^6
    float32 scores, where torch.sort takes 90 ms and sorting the integer keys 14 ms.

    The keys are the floats' bits, which sort like the values when none is negative or NaN (scores
    rarely are); otherwise the magnitude bits of negative numbers are flipped, so that integer order is
    float order, and NaNs go last, as torch.sort puts them. -0.0 sorts before 0.0, which torch.sort
    leaves to chance: the values are equal either way. A histogram of the keys' top 16 bits finds the
    bucket of each position, whose members are few; the rank within the bucket is selected among them.
    """
    kind = integer_view(flat.dtype)
    top = torch.iinfo(kind).max
    shift = 8 * flat.element_size() - 1

    def flipped(bits: Tensor) -> Tensor:  # its own inverse: the sign bit stays
        return bits ^ ((bits >> shift) & top)

    ordered = bool(flat.min() >= 0)  # False with a NaN
    keys = flat.view(kind) if ordered else flipped(flat.view(kind)).masked_fill_(flat.isnan(), top)
    buckets = (keys >> (shift + 1 - 16)).int() + (1 << 15)
    running = torch.bincount(buckets, minlength=1 << 16).cumsum(0)
    wanted = torch.searchsorted(running, positions, right=True)
    # one pass picks the members of every wanted bucket
    picked = torch.zeros(1 << 16, dtype=torch.bool, device=flat.device).index_fill_(0, wanted, True).index_select(
        0, buckets)
    members, member_buckets = keys[picked], buckets[picked]
    found = []
    for position, bucket in zip(positions.tolist(), wanted.tolist()):
        rank = position - (int(running[bucket - 1]) if bucket else 0)
        found.append(members[member_buckets == bucket].kthvalue(rank + 1).values)
    found = torch.stack(found)
    return (found if ordered else flipped(found)).view(flat.dtype)


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
    scores = by_rows(importance, [x, base])
    threshold = outlier_threshold(scores, generator)
    # The 0/1 mask is float32, so the sum is too (float64 for float64 inputs): mergekit's values, whatever
    # the input dtype; the output dtype rounds them once. Each chunk of scores is read before it is
    # overwritten, so the output takes their buffer when the dtypes agree.
    old, new, flat = base.reshape(-1), x.reshape(-1), scores.reshape(-1)
    wide = torch.promote_types(x.dtype, torch.float32)
    out = flat if flat.dtype == wide else torch.empty(flat.shape, dtype=wide, device=flat.device)
    for start, stop in chunk_ranges(out.numel()):
        mask = (flat[start:stop] >= threshold).float()
        torch.add(old[start:stop], (new[start:stop] - old[start:stop]) * mask, out=out[start:stop])
    return out.reshape(x.shape)


def importance(x: Tensor, base: Tensor) -> Tensor:
    """arcee_fusion's scores: the change's size times its row's KL divergence from the base's row."""
    p = x.softmax(-1)
    p += 1e-8
    divergence = base.softmax(-1)
    divergence += 1e-8
    torch.div(p, divergence, out=divergence)
    divergence.log_()
    divergence *= p
    scores = (x - base).abs()
    scores *= row_sums(divergence)
    return scores


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


# COMPARE: torch's CPU comparisons write 0/1 in their operands' own dtype 4-5x faster than they write bool
# (float32 and int32 alike: 0.1 vs 0.4-0.5 ns an element here), and a copy into bool costs 0.06 ns. So
# comparisons here write into a buffer of their operands' dtype, used as a 0/1 factor or copied into a bool
# mask: the same values either way.


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
    ints = flat.view(integer_view(flat.dtype))
    boundary, ties = boundary_key(ints, count, largest)
    beyond = torch.gt if largest else torch.lt
    flags = torch.empty(min(total, CHUNK), dtype=ints.dtype, device=ints.device)
    for start, stop in chunk_ranges(total, flags.numel()):
        part = ints[start:stop]
        mask[start:stop] = beyond(part, boundary, out=flags[:stop - start])  # see COMPARE
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
        # one bin per digit, and one more for the keys outside the prefix found so far
        histogram = torch.zeros((1 << 16) + 1, dtype=torch.int64, device=ints.device)
        for start, stop in chunk_ranges(ints.numel()):
            part = ints[start:stop]
            if shift == width - 16:  # keys are non-negative: the top digit needs no mask (int16 could not hold one)
                digits = part >> shift
            else:  # arithmetic, not a boolean index: 2x faster
                inside = torch.eq(part >> (shift + 16), prefix, out=torch.empty_like(part))  # see COMPARE
                digits = (part >> shift).bitwise_and_(0xFFFF).sub_(1 << 16).mul_(inside).add_(1 << 16)
            histogram += torch.bincount(digits, minlength=(1 << 16) + 1)
        counts = histogram[:1 << 16].flip(0) if largest else histogram[:1 << 16]
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
    kept = first_in_order(keys, bottom + keep, largest=False)  # in place below: no mask-sized temporaries
    return kept.logical_and_(first_in_order(keys, bottom, largest=False).logical_not_())


def uniform_draws(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 draws on the CPU generator. `draws < p` is bit for bit the mask
    torch.bernoulli(p) draws from the same generator state (both compare 24-bit uniforms with p), and
    draws taken chunk by chunk continue one stream, so chunking never changes a mask."""
    return torch.rand(tuple(shape), generator=generator).to(device)


def dare_mask(x: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each element with probability density (mergekit draws even at density 0)."""
    mask = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
    for start, stop in chunk_ranges(x.numel()):
        draws = uniform_draws((stop - start,), generator, x.device)
        mask[start:stop] = torch.lt(draws, density, out=draws)  # see COMPARE
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

    Each line's values with their positions in the low bits are distinct integers that sort as (value,
    position), so any sort orders them as a stable sort orders the values: sorting each line of them puts
    the position of rank r at r, and the table is scattered there. On the CPU numpy's vectorised sort does
    it (0.5 ms for 256 lines of 1024 here, where torch's stable sort of one flat (line, value) key took
    2.6 ms and its sort along a dimension 7 ms)."""
    if tie_break == MERGEKIT:
        return table[magnitudes.argsort(dim=1).argsort(dim=1)]
    lines, length, rest = magnitudes.shape
    value_bits = magnitudes.element_size() * 8 - 1  # non-negative: the sign bit is always 0
    position_bits = max(1, (length - 1).bit_length())
    if value_bits + position_bits > 63:  # float64 values: torch's stable sort along the dimension
        order = magnitudes.sort(dim=1, stable=True).indices
        return table.new_empty(magnitudes.shape).scatter_(1, order, table.view(1, -1, 1).expand(magnitudes.shape))
    key_type = torch.int32 if value_bits + position_bits <= 31 else torch.int64
    values = magnitudes.view(integer_view(magnitudes.dtype)).transpose(1, 2)
    keys = torch.empty((lines, rest, length), dtype=key_type, device=magnitudes.device)
    torch.bitwise_left_shift(values.to(key_type), position_bits, out=keys)
    keys |= torch.arange(length, dtype=key_type, device=keys.device)
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=-1)
    else:
        keys = keys.sort(dim=-1).values
    positions = keys.bitwise_and_((1 << position_bits) - 1).long()
    ranked = table.new_empty(keys.shape).scatter_(2, positions, table.expand(keys.shape))
    return ranked.transpose(1, 2)


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
        draws = uniform_draws(probabilities.shape, generator, x.device)
        mask[start:start + step] = torch.lt(draws, probabilities, out=draws)  # see COMPARE
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


def stacked_deltas(flats: Sequence[Tensor], flat_base: Tensor, columns: slice | Tensor) -> Tensor:
    """The task vectors' elements at `columns` (a slice, or an index tensor) stacked as [N, count]."""
    base_part = flat_base[columns]
    deltas = torch.empty((len(flats), base_part.numel()), dtype=flat_base.dtype, device=flat_base.device)
    for i, x in enumerate(flats):
        torch.sub(x[columns], base_part, out=deltas[i])
    return deltas


def elected(deltas: Tensor) -> Tensor:
    """TIES sign election over stacked deltas [N, c], as 0/1 in their dtype: the sign of the sum is the
    majority (0 counts as +), and an entry takes part when its own sign is that majority (never a zero)."""
    total = deltas.sum(dim=0)
    majority = torch.ge(total, 0, out=total).mul_(2).sub_(1)  # see COMPARE
    signs = deltas.sign()
    return torch.eq(signs, majority, out=signs)


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
    weighted = not bool((weights == 1).all())  # multiplying by 1 changes no bit
    flats = [x.reshape(-1) for x in models]
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    for start, stop in chunk_ranges(out.numel()):
        deltas = stacked_deltas(flats, flat_base, slice(start, stop))
        for i in range(len(flats)):
            if kept[i] is not None:
                deltas[i].mul_(as_factor(kept[i][start:stop], deltas.dtype))
            if scales[i] is not None:
                deltas[i].mul_(scales[i])
        if weighted:
            deltas.mul_(weights)
        if consensus:
            agree = elected(deltas)
            mixed = deltas.mul_(agree).sum(dim=0)
            if normalize:
                divisor = (agree.mul_(weights) if weighted else agree).sum(dim=0)
                divisor += torch.eq(divisor, 0, out=torch.empty_like(divisor))  # 0 -> 1, 15x faster than masked_fill_
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
        variance[start:stop] = population_variance(stacked_deltas(flats, flat_base, slice(start, stop)))
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
        deltas = stacked_deltas(flats, flat_base, slice(start, stop))
        if selected is not None:
            deltas.mul_(as_factor(selected[start:stop], deltas.dtype))
        for i, row in enumerate(deltas.square_()):
            squares[i] += sum64(row)
    means = torch.tensor([s / total for s in squares], dtype=torch.float64).to(base.dtype)
    weight_sum = means.sum().item()
    shares = (torch.ones_like(means) / len(flats) if abs(weight_sum) < 1e-6 else means / weight_sum)
    shares = shares.to(base.device).view(-1, 1)
    for start, stop in chunk_ranges(total):
        deltas = stacked_deltas(flats, flat_base, slice(start, stop))
        if selected is not None:
            deltas.mul_(as_factor(selected[start:stop], deltas.dtype))
        erased = shares * elected(deltas)  # Erase: only the entries that agree with the elected sign count
        merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
        torch.add(flat_base[start:stop], merged, out=out[start:stop])
    return out.view(base.shape)


def ram_masks(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Which entries changed (|τ| > ε), as 0/1 in the deltas' dtype, and how many models changed each
    element (exact in any dtype: at most 100 models)."""
    active = deltas.abs()
    torch.gt(active, epsilon, out=active)  # see COMPARE
    counts = active[:1].clone()
    for row in active[1:]:  # whole numbers add up exactly in any order: row by row is 2x faster than sum(dim=0)
        counts += row
    return active, counts


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
    deltas = stacked_deltas(flats, base.reshape(-1), slice(None))
    active, counts = ram_masks(deltas, epsilon)
    # mergekit adds z·[c = 1] + z·[c > 1] / max(c, 1) for z = τ·active: one term is z or z / c and the
    # other a zero of z's sign, so each sum is exactly z / max(c, 1), with the same bits and half the work
    merged = deltas.mul_(active).div_(counts.clamp_(min=1)).sum(dim=0)
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
    changes = torch.zeros(len(flats), dtype=torch.float64, device=base.device)
    unique_counts = torch.zeros_like(changes)
    # mergekit's ratio and factor (below) are float32 tensors (the default dtype), which promote half inputs
    out = torch.empty(flat_base.shape, dtype=torch.promote_types(base.dtype, torch.get_default_dtype()),
                      device=base.device)
    alone = torch.empty(flat_base.shape, dtype=torch.bool, device=base.device)  # changed by one model only
    # As in ram, of mergekit's two terms z·[c = 1]·λ and z·[c > 1] / max(c, 1) one is a signed zero, and each
    # element takes the same term from every model: its sum over the models is the sum of that term. The first
    # pass counts and writes the averaged sums everywhere; once λ is known, the second redoes the elements one
    # model changed (few, in most merges) with the amplified term.
    for start, stop in chunk_ranges(flat_base.numel()):
        deltas = stacked_deltas(flats, flat_base, slice(start, stop))
        active, counts = ram_masks(deltas, epsilon)
        lone = torch.eq(counts, 1, out=torch.empty_like(counts))  # see COMPARE
        alone[start:stop] = lone[0]
        # whole numbers below 2^24 per chunk: exact in float32 sums (6x faster than float64 ones)
        changes += active.sum(dim=1, dtype=torch.float32)
        averaged = deltas.mul_(active).div_(counts.clamp_(min=1)).to(out.dtype).sum(dim=0)
        torch.add(flat_base[start:stop], averaged, out=out[start:stop])
        unique_counts += active.mul_(lone).sum(dim=1, dtype=torch.float32)
    # a change is unique (one model made it) or shared
    shared, unique_counts = (changes - unique_counts).to(torch.int64), unique_counts.to(torch.int64)
    ratio = shared / unique_counts.clamp(min=epsilon)
    factor = (1 + r * ratio.clamp(min=0, max=alpha)).unsqueeze(-1)
    for start, stop in chunk_ranges(flat_base.numel()):
        lone = alone[start:stop]
        found = int(lone.count_nonzero())
        if not found:
            continue
        # gathered when few, the whole chunk when many (a gather costs more than the arithmetic it saves)
        columns = lone.nonzero().view(-1).add_(start) if found * 8 < stop - start else slice(start, stop)
        deltas = stacked_deltas(flats, flat_base, columns)
        active, _ = ram_masks(deltas, epsilon)
        amplified = torch.add(flat_base[columns], (deltas.mul_(active) * factor).sum(dim=0))
        out[columns] = select(lone, amplified, out[columns]) if isinstance(columns, slice) else amplified
    return out.view(base.shape)
