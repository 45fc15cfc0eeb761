"""TSV-M, Iso-C, Iso-CTS, CART and MagMax (../shared/spec/new-methods.md).

Each method is checked against a slow whole-matrix oracle written here from the papers' equations, then
against the properties the spec lists, then through the CLI (matrix path, fallback, dtypes, errors).
"""

import pytest
import torch

import merge
import methods
from conftest import llama_like, load, save_safetensors, tree_hash

F64 = torch.float64
SVD_DEFAULTS = dict(rank_guard=False, svd_solver="exact", svd_max_dim=32768)


def family(count, rows=13, cols=21, seed=0, dtype=F64, scale=1.0):
    """A base and `count` fine-tunes (base + random deltas); 13 x 21 so that r/T leaves remainders."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g, dtype=dtype)
    return base, [base + scale * torch.randn(rows, cols, generator=g, dtype=dtype) for _ in range(count)]


def low_rank(rows, cols, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=F64) @ torch.randn(rank, cols, generator=g, dtype=F64)


def tsv_m(models, base, lambda_=1.0, weight=None, **options):
    return methods.tsv_m(models, base=base, weight=weight or [1.0] * len(models), lambda_=lambda_,
                         **{**SVD_DEFAULTS, **options})


def iso_c(models, base, lambda_=1.0, **options):
    return methods.iso_c(models, base=base, lambda_=lambda_, **{**SVD_DEFAULTS, **options})


def iso_cts(models, base, lambda_=1.0, fraction=0.8, **options):
    return methods.iso_cts(models, base=base, lambda_=lambda_, common_space_fraction=fraction,
                           **{**SVD_DEFAULTS, **options})


def cart(models, lambda_=2.0, rank_ratio=0.12, svd_solver="exact"):
    return methods.cart(models, lambda_=lambda_, rank_ratio=rank_ratio, svd_solver=svd_solver, svd_max_dim=32768)


def magmax(models, base, lambda_=0.5):
    return methods.magmax(models, base=base, lambda_=lambda_)


def svd(a):
    return torch.linalg.svd(a, full_matrices=False)


def polar(a):
    p, _, qh = svd(a)
    return p @ qh


def caught(kind, call):
    """The result of call() and whether it warned with this MethodWarning kind."""
    import warnings

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        result = call()
    return result, any(getattr(r.message, "kind", None) == kind for r in records)


# ---------------------------------------------------------------------------------------------------
# oracles, from the papers' equations, whole matrices, float64


def tsv_m_zero_padded_reference(models, base, lambda_, weights):
    """The reference code's form: factors zero-padded to width r, then polar factors of the padded ones."""
    rows, cols = base.shape
    r = min(rows, cols)
    k = int(r * (1 / len(models)))
    padded_u, padded_vh = torch.zeros(rows, r, dtype=F64), torch.zeros(r, cols, dtype=F64)
    padded_s = torch.zeros(r, dtype=F64)
    for i, (x, w) in enumerate(zip(models, weights)):
        u, s, vh = svd(w * (x - base))
        padded_u[:, i * k:(i + 1) * k] = u[:, :k]
        padded_s[i * k:(i + 1) * k] = s[:k]
        padded_vh[i * k:(i + 1) * k] = vh[:k]
    return base + lambda_ * (polar(padded_u) @ torch.diag(padded_s) @ polar(padded_vh))


def iso_c_reference(models, base, lambda_):
    u, s, vh = svd(sum(x - base for x in models))
    return base + lambda_ * s.mean() * (u @ vh)


def iso_cts_reference(models, base, lambda_, fraction):
    """Spelled out as the reference does it, including the m x m projector."""
    deltas = [x - base for x in models]
    rows, cols = base.shape
    r, count = min(rows, cols), len(models)
    task_total = round((r - int(r * fraction)) / count) * count
    if task_total > r:
        task_total -= count
    common, per_task = r - task_total, task_total // count
    u, s, vh = svd(sum(deltas))
    blocks_u, blocks_s, blocks_vh = [], [], []
    projector = torch.eye(rows, dtype=F64) - u[:, :common] @ u[:, :common].T
    for delta in deltas:
        tu, ts, tvh = svd(projector @ delta)
        blocks_u.append(tu[:, :per_task])
        blocks_s.append(ts[:per_task])
        blocks_vh.append(tvh[:per_task])
    stacked_u = torch.cat(blocks_u + [u[:, :common]], dim=1)
    stacked_s = torch.cat(blocks_s + [s[:common]])
    stacked_vh = torch.cat(blocks_vh + [vh[:common]])
    return base + lambda_ * stacked_s.mean() * (polar(stacked_u) @ polar(stacked_vh))


def cart_reference(models, lambda_, rank_ratio):
    average = sum(models) / len(models)
    r = min(average.shape)
    k = 0 if rank_ratio == 0 else r if rank_ratio == 1 else max(1, int(rank_ratio * r))
    total = torch.zeros_like(average)
    for x in models:
        u, s, vh = svd(x - average)
        total += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return average + lambda_ * total


def magmax_reference(models, base, lambda_):
    """argmax |Δ| over the models; searching them in reverse makes the later model win a tie."""
    deltas = torch.stack([x - base for x in models][::-1])
    index = deltas.abs().argmax(dim=0, keepdim=True)
    return base + lambda_ * deltas.gather(0, index)[0]


# ---------------------------------------------------------------------------------------------------
# each method against its oracle


@pytest.mark.parametrize("count", [2, 3, 5])
def test_tsv_m_matches_the_zero_padded_reference(count):
    base, models = family(count, seed=count)
    weights = [1.0, -0.5, 2.0, 0.7, 1.3][:count]
    expected = tsv_m_zero_padded_reference(models, base, 0.8, weights)
    assert torch.allclose(tsv_m(models, base, 0.8, weights), expected, rtol=0, atol=1e-5)


def test_tsv_m_in_float32_matches_the_float64_reference_to_1e_5():
    base, models = family(3, rows=40, cols=24, seed=3, scale=0.1)
    expected = tsv_m_zero_padded_reference(models, base, 1.0, [1.0] * 3)
    out = tsv_m([m.float() for m in models], base.float())
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(13, 21), (21, 13), (16, 16)])
def test_iso_c_matches_its_equations(shape):
    base, models = family(3, *shape, seed=7)
    assert torch.allclose(iso_c(models, base, 1.5), iso_c_reference(models, base, 1.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape,count,fraction", [((13, 21), 2, 0.8), ((21, 13), 3, 0.8), ((32, 32), 4, 0.5),
                                                  ((20, 30), 3, 0.1)])
def test_iso_cts_matches_its_equations(shape, count, fraction):
    base, models = family(count, *shape, seed=11)
    expected = iso_cts_reference(models, base, 1.5, fraction)
    assert torch.allclose(iso_cts(models, base, 1.5, fraction), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("count,rank_ratio", [(3, 0.12), (4, 0.3), (5, 0.5)])
def test_cart_matches_its_equations(count, rank_ratio):
    _, models = family(count, seed=13)
    assert torch.allclose(cart(models, 1.7, rank_ratio), cart_reference(models, 1.7, rank_ratio), rtol=0, atol=1e-5)


def test_magmax_matches_the_argmax_oracle_with_ties_to_the_later_model():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1000, generator=g)
    # small integers: many exact magnitude ties, of both signs
    models = [base + torch.randint(-3, 4, (1000,), generator=g).float() for _ in range(4)]
    assert torch.equal(magmax(models, base), magmax_reference(models, base, 0.5))


def test_magmax_later_model_wins_a_magnitude_tie():
    first = torch.tensor([2.0, -1.0, 0.5])
    second = torch.tensor([-2.0, 0.5, -0.5])
    merged = methods.magmax([first, second], base=torch.zeros(3), lambda_=1.0)
    assert torch.equal(merged, torch.tensor([-2.0, -1.0, -0.5]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_select_is_torch_where_bit_for_bit(dtype):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -2.5, 3.0])
    if_true, if_false = special.to(dtype), special.flip(0).to(dtype)
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    bits = methods.integer_view(dtype)
    expected = torch.where(mask, if_true, if_false)
    assert torch.equal(methods.select(mask, if_true, if_false).view(bits), expected.view(bits))


def test_magmax_chunked_is_bit_identical_to_whole_tensor():
    g = torch.Generator().manual_seed(2)
    numel = 2 * methods.CHUNK + 12345
    base = torch.randn(numel, generator=g)
    models = [base + torch.randn(numel, generator=g) for _ in range(3)]
    whole = magmax(models, base)
    chunked = torch.cat([magmax([m[a:b] for m in models], base[a:b])
                         for a, b in methods.chunk_ranges(numel)])
    assert torch.equal(whole, chunked)


# ---------------------------------------------------------------------------------------------------
# properties (§0.6 and each method's list)


def test_tsv_m_with_one_model_gives_base_plus_lambda_delta():
    base, (model,) = family(1, seed=1)
    assert torch.allclose(tsv_m([model], base, 0.7), base + 0.7 * (model - base), rtol=0, atol=1e-10)


def test_magmax_with_one_model_gives_base_plus_lambda_delta():
    base, (model,) = family(1, seed=1)
    assert torch.equal(magmax([model], base), base + 0.5 * (model - base))


@pytest.mark.parametrize("merge_fn", [tsv_m, iso_c, iso_cts, magmax])
def test_zero_task_vectors_give_the_base(merge_fn):
    base, _ = family(0)
    assert torch.equal(merge_fn([base.clone(), base.clone(), base.clone()], base), base)


@pytest.mark.parametrize("merge_fn", [tsv_m, iso_c, iso_cts])
def test_model_order_does_not_matter(merge_fn):
    base, models = family(3, seed=21)
    order = [2, 0, 1]
    assert torch.allclose(merge_fn(models, base), merge_fn([models[i] for i in order], base), rtol=0, atol=1e-10)


def test_tsv_m_model_order_does_not_matter_with_weights_permuted_along():
    base, models = family(3, seed=22)
    weights = [0.5, 1.5, -1.0]
    permuted = tsv_m([models[i] for i in (1, 2, 0)], base, weight=[weights[i] for i in (1, 2, 0)])
    assert torch.allclose(tsv_m(models, base, weight=weights), permuted, rtol=0, atol=1e-10)


def test_cart_model_order_does_not_matter():
    _, models = family(4, seed=23)
    assert torch.allclose(cart(models), cart(models[::-1]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", ["exact", "lowrank", "gram"])
def test_every_method_is_deterministic(solver):
    base, models = family(4, 48, 40, seed=24, dtype=torch.float32)
    for run in (lambda: tsv_m(models, base, svd_solver=solver),
                lambda: iso_cts(models, base, svd_solver=solver),
                lambda: cart(models, svd_solver=solver)):
        assert torch.equal(run(), run())


def test_tsv_m_transpose_homogeneity_and_orthogonal_equivariance():
    base, models = family(3, seed=25)
    deltas = [m - base for m in models]
    merged = tsv_m(models, base) - base

    def merged_delta(ds):
        zero = torch.zeros_like(ds[0])
        return tsv_m(ds, zero)

    assert torch.allclose(merged_delta([d.T for d in deltas]), merged.T, atol=1e-10)
    assert torch.allclose(merged_delta([-2.5 * d for d in deltas]), -2.5 * merged, atol=1e-10)
    q = torch.linalg.qr(torch.randn(13, 13, dtype=F64)).Q
    r = torch.linalg.qr(torch.randn(21, 21, dtype=F64)).Q
    assert torch.allclose(merged_delta([q @ d @ r for d in deltas]), q @ merged @ r, atol=1e-10)


def test_tsv_m_on_tasks_in_orthogonal_subspaces_sums_their_rank_k_truncations():
    q = torch.linalg.qr(torch.randn(12, 12, dtype=F64)).Q
    r = torch.linalg.qr(torch.randn(12, 12, dtype=F64)).Q
    # task i lives in columns/rows [6i, 6i + 6) of q and r; k = 6 keeps its top 3 + the next 3
    deltas = [q[:, 6 * i:6 * i + 6] @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0.5], dtype=F64) * (i + 1))
              @ r[:, 6 * i:6 * i + 6].T for i in range(2)]
    expected = sum(deltas)  # rank 6 each = k, so the truncation keeps all
    assert torch.allclose(tsv_m(deltas, torch.zeros(12, 12, dtype=F64)), expected, atol=1e-10)


def test_tsv_m_singular_values_are_the_kept_ones_plus_zeros():
    base, models = family(3, seed=38)
    kept = torch.cat([torch.linalg.svdvals(m - base)[:4] for m in models])  # k = int(13 / 3) = 4
    values = torch.linalg.svdvals(tsv_m(models, base) - base)
    assert torch.allclose(values[:12], kept.sort(descending=True).values, atol=1e-10)
    assert torch.allclose(values[12:], torch.zeros(1, dtype=F64), atol=1e-10)


def test_iso_c_returns_a_sum_with_a_flat_spectrum_unchanged():
    q = torch.linalg.qr(torch.randn(16, 16, dtype=F64)).Q
    halves = [q[:, :8] @ q[:8, :] * 3.0, q[:, 8:] @ q[8:, :] * 3.0]  # their sum is 3 x an orthogonal matrix
    zero = torch.zeros(16, 16, dtype=F64)
    assert torch.allclose(iso_c(halves, zero), sum(halves), atol=1e-10)


def test_iso_c_flattens_the_spectrum_and_keeps_the_nuclear_norm():
    base, models = family(3, seed=26)
    total = sum(m - base for m in models)
    merged = iso_c(models, base) - base
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values, torch.linalg.svdvals(total).mean().expand_as(values), atol=1e-10)
    assert torch.isclose(values.sum(), torch.linalg.svdvals(total).sum(), atol=1e-10)


def test_iso_c_of_identical_models_is_t_times_mean_s_times_polar_not_the_model():
    base, (model,) = family(1, seed=27)
    delta = model - base
    merged = iso_c([model, model, model], base) - base
    assert torch.allclose(merged, 3 * torch.linalg.svdvals(delta).mean() * polar(delta), atol=1e-10)
    assert not torch.allclose(merged, delta, atol=1e-3)


@pytest.mark.parametrize("shape", [(13, 21), (21, 13)])
def test_iso_cts_at_fraction_1_equals_iso_c(shape):
    base, models = family(3, *shape, seed=28)
    assert torch.allclose(iso_cts(models, base, fraction=1.0), iso_c(models, base), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank,count,expected", [(100, 8, (84, 2)), (64, 8, (48, 2)), (768, 8, (616, 19)),
                                                 (768, 20, (608, 8)), (4096, 8, (3280, 102))])
def test_iso_cts_splits_directions_as_the_spec_examples(rank, count, expected):
    assert methods.iso_cts_split(rank, count, 0.8) == expected


def test_iso_cts_split_never_asks_for_more_task_directions_than_there_are():
    assert methods.iso_cts_split(3, 2, 0.1) == (1, 1)  # round(3 / 2) * 2 = 4 > 3, so one task block less


def test_iso_cts_output_spectrum_is_flat():
    base, models = family(3, 24, 30, seed=29)
    values = torch.linalg.svdvals(iso_cts(models, base) - base)
    assert torch.allclose(values, values.mean().expand_as(values), atol=1e-10)


def test_iso_cts_is_orthogonally_equivariant():
    base, models = family(3, seed=30)
    deltas = [m - base for m in models]
    zero = torch.zeros(13, 21, dtype=F64)
    q = torch.linalg.qr(torch.randn(13, 13, dtype=F64)).Q
    r = torch.linalg.qr(torch.randn(21, 21, dtype=F64)).Q
    merged = iso_cts(deltas, zero)
    assert torch.allclose(iso_cts([q @ d @ r for d in deltas], zero), q @ merged @ r, atol=1e-10)


def test_cart_returns_identical_inputs_unchanged():
    _, (model,) = family(1, seed=31)
    assert torch.allclose(cart([model, model.clone(), model.clone()]), model, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank_ratio", [0.0, 0.12, 0.5, 1.0])
def test_cart_of_two_models_is_their_average(rank_ratio):
    _, models = family(2, seed=32)
    assert torch.allclose(cart(models, rank_ratio=rank_ratio), (models[0] + models[1]) / 2, rtol=0, atol=1e-10)


def test_cart_at_rank_ratio_0_is_exactly_the_average_and_at_1_the_average_to_rounding():
    _, models = family(3, seed=33)
    average = sum(models) / 3
    assert torch.equal(cart(models, rank_ratio=0.0), average)
    assert torch.allclose(cart(models, rank_ratio=1.0), average, rtol=0, atol=1e-10)
    assert not torch.allclose(cart(models, rank_ratio=0.12), average, atol=1e-3)


def test_cart_is_translation_equivariant():
    _, models = family(3, seed=34)
    shift = torch.randn(13, 21, dtype=F64)
    assert torch.allclose(cart([m + shift for m in models]), cart(models) + shift, atol=1e-10)


def test_lowrank_and_gram_solvers_agree_with_exact_where_they_apply():
    # matrices of rank 20 < k + 16, whose range the randomized sketch captures exactly
    base = torch.randn(64, 48, dtype=F64)
    models = [base + low_rank(64, 48, 20, seed) for seed in range(4)]
    common_columns = torch.randn(64, 20, dtype=F64)  # deviations from the mean of rank 20 too
    cart_models = [base + common_columns @ torch.randn(20, 48, dtype=F64) for _ in range(4)]
    for solver in ("lowrank", "gram"):
        assert torch.allclose(tsv_m(models, base, svd_solver=solver), tsv_m(models, base), atol=1e-8), solver
        assert torch.allclose(cart(cart_models, svd_solver=solver), cart(cart_models), atol=1e-8), solver
    generic_base, generic = family(3, seed=35)
    assert torch.allclose(iso_c(generic, generic_base, svd_solver="gram"), iso_c(generic, generic_base), atol=1e-8)
    assert torch.allclose(iso_cts(generic, generic_base, svd_solver="gram"), iso_cts(generic, generic_base), atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# ill-posed inputs: warnings, and rank_guard


def test_tsv_m_warns_when_one_task_vector_is_zero_and_rank_guard_silences_it():
    base, models = family(2, seed=36)
    _, warned = caught("rank-deficient", lambda: tsv_m(models + [base.clone()], base))
    assert warned
    out, warned = caught("rank-deficient", lambda: tsv_m(models + [base.clone()], base, rank_guard=True))
    assert not warned and torch.isfinite(out).all()


def test_tsv_m_warns_on_duplicate_models_and_rank_guard_gives_the_rank_k_truncation():
    base, (model,) = family(1, 16, 16, seed=37)
    _, warned = caught("near-duplicate", lambda: tsv_m([model, model.clone()], base))
    assert warned
    u, s, vh = svd(model - base)
    truncation = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
    assert torch.allclose(tsv_m([model, model.clone()], base, rank_guard=True) - base, truncation, atol=1e-10)


def test_iso_c_warns_on_a_rank_deficient_sum_and_rank_guard_makes_it_precision_independent():
    base = torch.zeros(64, 64, dtype=F64)
    models = [low_rank(64, 64, 3, seed) for seed in (1, 2)]  # sum of rank 6
    _, warned = caught("rank-deficient", lambda: iso_c(models, base))
    assert warned
    wide = iso_c(models, base, rank_guard=True)
    narrow = iso_c([m.float() for m in models], base.float(), rank_guard=True).double()
    assert (narrow - wide).norm() / wide.norm() < 1e-6
    # the nuclear norm is kept, now on the 6 real directions
    assert torch.isclose(torch.linalg.svdvals(wide).sum(), torch.linalg.svdvals(sum(models)).sum())
    assert torch.linalg.matrix_rank(wide) == 6


def test_iso_cts_rank_guard_ignores_projection_noise_of_low_rank_tasks():
    base = torch.zeros(64, 64, dtype=F64)
    models = [low_rank(64, 64, 3, seed) for seed in (3, 4)]  # every task lies inside the common subspace
    _, warned = caught("rank-deficient", lambda: iso_cts(models, base))
    assert warned
    wide = iso_cts(models, base, rank_guard=True)
    narrow = iso_cts([m.float() for m in models], base.float(), rank_guard=True).double()
    assert (narrow - wide).norm() / wide.norm() < 1e-5
    assert torch.allclose(wide, iso_c(models, base, rank_guard=True), atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# the CLI: matrix path, fallback, dtypes, errors


def write_family(tmp_path, count, dtype=torch.float32, base_dtype=None, state=llama_like):
    base = save_safetensors(tmp_path / "base.safetensors", state(100, base_dtype or dtype))
    models = [save_safetensors(tmp_path / f"m{i}.safetensors", state(i, dtype)) for i in range(count)]
    return base, models


def test_matrix_weights_take_the_method_and_everything_else_the_fallback(tmp_path, run):
    base, models = write_family(tmp_path, 2)
    code, _, err = run("--method", "tsv-m", "--base", base, "--models", *models, "--lambda", "0.8",
                       "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    b, states = llama_like(100), [llama_like(i) for i in range(2)]
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(out[name], tsv_m([s[name] for s in states], b[name], 0.8), atol=1e-6)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "logit_scale",
                 "model.layers.0.input_layernorm.weight"):
        expected = b[name] + 0.8 * (((states[0][name] - b[name]) + (states[1][name] - b[name])) / 2)
        assert torch.equal(out[name], expected), name
    assert torch.equal(out["position_ids"], b["position_ids"])
    assert "warning" not in err


@pytest.mark.parametrize("name,extra", [("tsv_m", ()), ("iso_c", ("--lambda", "1.5")), ("iso_cts", ("--rank-guard",)),
                                        ("magmax", ()), ("tsv_m", ("--svd-solver", "lowrank")),
                                        ("iso_c", ("--svd-solver", "gram"))])
def test_base_methods_run_end_to_end_and_write_the_base_dtype(tmp_path, run, name, extra):
    base, models = write_family(tmp_path, 3, base_dtype=torch.bfloat16)
    code, _, err = run("--method", name, "--base", base, "--models", *models, *extra, "--output", "out/")
    assert code == 0, err
    out = load(tmp_path / "out")
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert out["model.norm.weight"].dtype == torch.bfloat16
    assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "cart"])
def test_a_half_precision_compute_dtype_still_runs_the_svds_in_float32(tmp_path, run, name):
    base, models = write_family(tmp_path, 3)
    with_base = () if name == "cart" else ("--base", base)
    code, _, err = run("--method", name, *with_base, "--models", *models, "--compute-dtype", "bfloat16",
                       "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_cart_runs_without_a_base_writes_the_first_models_dtype_and_ignores_a_base(tmp_path, run):
    base, models = write_family(tmp_path, 3, dtype=torch.float16, base_dtype=torch.float32)
    code, _, err = run("--method", "cart", "--models", *models, "--output", "a.safetensors")
    assert code == 0, err
    code, _, err = run("--method", "cart", "--models", *models, "--base", base, "--output", "b.safetensors")
    assert code == 0 and f"warning: --base {base} is ignored: cart does not use a base model" in err
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    states = [{k: v.float() for k, v in llama_like(i, torch.float16).items()} for i in range(3)]
    name = "model.norm.weight"  # the fallback: the plain average
    assert torch.equal(a[name], (sum(s[name] for s in states) / 3).half())


def test_matrices_over_svd_max_dim_fall_back_with_a_warning(tmp_path, run):
    base, models = write_family(tmp_path, 2)
    code, _, err = run("--method", "iso_c", "--base", base, "--models", *models, "--svd-max-dim", "8",
                       "--output", "o.safetensors")
    assert code == 0, err
    assert "warning: tensor model.layers.0.mlp.up_proj.weight: 16 x 8 is larger than --svd-max-dim 8" in err
    assert "(and 1 more like it)" in err
    out = load(tmp_path / "o.safetensors")
    b, states = llama_like(100), [llama_like(i) for i in range(2)]
    up, q = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[up], b[up] + 1.0 * (((states[0][up] - b[up]) + (states[1][up] - b[up])) / 2))
    assert torch.allclose(out[q], iso_c([s[q] for s in states], b[q]), atol=1e-6)


def test_tsv_m_falls_back_with_a_warning_where_it_would_keep_no_direction(tmp_path, run):
    def state(seed, dtype):
        g = torch.Generator().manual_seed(seed)
        return {"row.weight": torch.randn(1, 8, generator=g).to(dtype),
                "w.weight": torch.randn(8, 8, generator=g).to(dtype)}

    base, models = write_family(tmp_path, 2, state=state)
    code, _, err = run("--method", "tsv_m", "--base", base, "--models", *models, "--output", "o.safetensors")
    assert code == 0, err
    assert "warning: tensor row.weight: TSV-M keeps int(r/T) = 0 directions of a 1 x 8 matrix per model" in err
    b, states = state(100, torch.float32), [state(i, torch.float32) for i in range(2)]
    out = load(tmp_path / "o.safetensors")
    assert torch.equal(out["row.weight"], b["row.weight"] + ((states[0]["row.weight"] - b["row.weight"])
                                                             + (states[1]["row.weight"] - b["row.weight"])) / 2)


def test_rank_deficiency_is_reported_once_per_kind_with_the_tensor_name(tmp_path, run):
    base, models = write_family(tmp_path, 2)
    twin = save_safetensors(tmp_path / "twin.safetensors", llama_like(0))
    code, _, err = run("--method", "tsv_m", "--base", base, "--models", models[0], twin, "--output", "o.safetensors")
    assert code == 0
    lines = [line for line in err.splitlines() if "near-duplicate" in line or "nearly linearly dependent" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: tensor model.layers.")
    assert lines[0].endswith("(and 3 more like it)")  # q_proj and up_proj of both layers


@pytest.mark.parametrize("argv,message", [
    (("--method", "cart", "--models", "m0.safetensors", "m1.safetensors"),
     "cart needs at least 3 models, found 2 (m0.safetensors, m1.safetensors); with 2 models CART is exactly "
     "their average: use --method linear"),
    (("--method", "iso-cts", "--models", "m0.safetensors", "m1.safetensors"),
     "iso_cts needs a base model: give it with --base PATH"),
    (("--method", "magmax", "--models", "m0.safetensors", "m1.safetensors"),
     "magmax needs a base model: give it with --base PATH"),
    (("--method", "iso_c", "--base", "base.safetensors", "--models", "m0.safetensors", "m1.safetensors",
      "--svd-solver", "lowrank"),
     "iso_c: --svd-solver lowrank does not apply: iso_c needs the whole spectrum (use exact or gram)"),
    (("--method", "iso_cts", "--base", "base.safetensors", "--models", "m0.safetensors", "m1.safetensors",
      "--common-space-fraction", "0"),
     "iso_cts: --common-space-fraction must be > 0 and <= 1 (got 0)"),
    (("--method", "tsv_m", "--base", "base.safetensors", "--models", "m0.safetensors", "m1.safetensors",
      "--lambda", "-1"),
     "tsv_m: --lambda must be >= 0 (got -1)"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, run, argv, message):
    write_family(tmp_path, 2)
    before = tree_hash(tmp_path)
    code, out, err = run(*argv, "--output", "o.safetensors")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {message}"]
    assert tree_hash(tmp_path) == before


def test_methods_table_lists_the_new_methods_with_their_dtype_rules():
    table = merge.methods_table()
    for name in ("tsv_m", "iso_c", "iso_cts", "cart", "magmax"):
        assert f"| `{name}` |" in table
    assert "| `cart` |" in table and "first model's | matrix |" in table.split("| `cart` |")[1].split("\n")[0]
    assert "base's | matrix |" in table.split("| `tsv_m` |")[1].split("\n")[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "cart", "magmax"])
def test_cuda_results_match_cpu_to_a_tolerance(tmp_path, run, name):
    base, models = write_family(tmp_path, 3)
    with_base = () if name == "cart" else ("--base", base)
    for device in ("cpu", "cuda"):
        code, _, err = run("--method", name, *with_base, "--models", *models, "--device", device,
                           "--output", f"{device}.safetensors")
        assert code == 0, err
    cpu, cuda = load(tmp_path / "cpu.safetensors"), load(tmp_path / "cuda.safetensors")
    for key in cpu:
        if cpu[key].is_floating_point():
            assert torch.allclose(cpu[key], cuda[key], rtol=1e-4, atol=1e-4), key


def failing_svd(monkeypatch, fails_for):
    """torch.linalg.svd that raises LAPACK's convergence error for the dtypes in `fails_for`."""
    real = torch.linalg.svd
    seen = []

    def svd(matrix, full_matrices=True):
        seen.append(matrix.dtype)
        if matrix.dtype in fails_for:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return seen


@pytest.mark.parametrize("solver", ["exact", "lowrank"])
def test_an_svd_that_does_not_converge_in_float32_is_taken_again_in_float64(monkeypatch, solver):
    base, models = family(3, rows=40, cols=56, dtype=torch.float32)
    expected = iso_cts([m.double() for m in models], base.double(), svd_solver=solver)
    seen = failing_svd(monkeypatch, {torch.float32})
    out = iso_cts(models, base, svd_solver=solver)
    assert torch.float32 in seen and F64 in seen
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_an_svd_that_never_converges_is_one_error_naming_the_tensor(tmp_path, run, monkeypatch):
    base, models = write_family(tmp_path, 2)
    failing_svd(monkeypatch, {torch.float32, F64})
    code, _, err = run("--method", "iso_c", "--base", base, "--models", *models, "--output", "o.safetensors")
    assert code == 2 and not (tmp_path / "o.safetensors").exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("error: tensor model.layers.0.") and "did not converge, even in float64" in line
