"""The mixers of SPEC §2: manifold residuals, gradients, backward modes, errors, and the SPEC §1 orientation.

Tolerances are SPEC §2's float32 exactness targets: doubly stochastic ``max|H1 − 1|, max|Hᵀ1 − 1| ≤ 1e-5``,
orthogonal ``max|HᵀH − I| ≤ 1e-5``, spectral ``‖H‖₂ ≤ 1 + 1e-5`` with unit row and column sums.
"""

import math

import pytest
import torch

from hf_jpmhc.models.hyper_connection import HyperConnection
from hf_jpmhc.models.mixers import ALIASES, MIXERS, build_mixer

TOL = 1e-5
STREAMS = (2, 3, 4, 6, 8)
BATCH = 64  # random θ per case



def valid_streams(name: str) -> list[int]:
    if name == "permutation":
        return [n for n in STREAMS if n <= 6]
    if name == "kronecker":
        return [n for n in STREAMS if n & (n - 1) == 0]
    return list(STREAMS)


def mixer_cases() -> list:
    """(mixer, n, options) for every mixer and valid n; grassmann at every rank 1..n−1."""
    cases = []
    for name in MIXERS:
        for n in valid_streams(name):
            if name == "grassmann":
                cases += [pytest.param(name, n, {"grassmann_rank": p}, id=f"grassmann-n{n}-p{p}") for p in range(1, n)]
            else:
                cases.append(pytest.param(name, n, {}, id=f"{name}-n{n}"))
    return cases


def random_logits(num_logits: int, kind: str, dtype=torch.float32) -> torch.Tensor:
    """θ (BATCH, r): ``uniform10`` |θ| ≤ 10, ``uniform1e4`` |θ| ≤ 1e4, ``signs1e4`` ±1e4, ``equal1e4`` 1e4."""
    shape = (BATCH, num_logits)
    if kind == "uniform10":
        return (torch.rand(shape, dtype=dtype) * 2 - 1) * 10
    if kind == "uniform1e4":
        return (torch.rand(shape, dtype=dtype) * 2 - 1) * 1e4
    if kind == "signs1e4":
        return torch.randint(0, 2, shape).to(dtype) * 2e4 - 1e4
    return torch.full(shape, 1e4, dtype=dtype)


def row_col_residuals(h: torch.Tensor) -> tuple[float, float]:
    return (h.sum(-1) - 1).abs().max().item(), (h.sum(-2) - 1).abs().max().item()


def orthogonality_residual(h: torch.Tensor) -> float:
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return (h.transpose(-1, -2) @ h - eye).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# manifold residuals
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform10", "uniform1e4", "signs1e4", "equal1e4"])
@pytest.mark.parametrize(("name", "n", "options"), mixer_cases())
def test_manifold_residuals(name, n, options, kind):
    mixer = build_mixer(name, n, **options)
    theta = random_logits(mixer.num_logits, kind)
    h = mixer(theta)
    assert h.shape == (BATCH, n, n) and h.dtype == torch.float32
    assert h.isfinite().all(), "NaN/Inf in H"
    rows, cols = row_col_residuals(h)

    if name == "identity":
        assert torch.equal(h, torch.eye(n).expand_as(h))
    elif name == "unconstrained":
        assert torch.equal(h, torch.eye(n) + theta.unflatten(-1, (n, n)))
    elif name == "sinkhorn" and kind != "uniform10":
        # SPEC §2 holds Sinkhorn to its tolerance only for |θ| ≤ 10; beyond, the last column normalisation
        # still makes the columns exact and every entry stays a probability.
        assert cols <= TOL and (h >= 0).all() and (h <= 1 + TOL).all()
    elif name in ("sinkhorn", "permutation", "kronecker", "transport"):
        assert rows <= TOL and cols <= TOL, f"doubly stochastic residual rows {rows:.2e}, cols {cols:.2e}"
        assert (h >= -TOL).all(), f"negative entry {h.min().item():.2e}"
    elif name == "spectral":
        assert rows <= TOL and cols <= TOL, f"row/col sums residual {rows:.2e}, {cols:.2e}"
        assert torch.linalg.matrix_norm(h.double(), ord=2).max().item() <= 1 + TOL
    elif name == "stiefel":
        assert orthogonality_residual(h) <= TOL
        assert (torch.linalg.det(h.double()) - 1).abs().max().item() <= 1e-4
    elif name == "grassmann":
        p = options["grassmann_rank"]
        assert rows <= TOL and cols <= TOL, f"row/col sums residual {rows:.2e}, {cols:.2e}"
        expected = torch.tensor([1.0] * (p + 1) + [0.0] * (n - 1 - p), dtype=torch.float64)
        singular_values = torch.linalg.svdvals(h.double())  # descending
        assert (singular_values - expected).abs().max().item() <= TOL
        if p == n - 1:
            assert orthogonality_residual(h) <= TOL
    else:
        raise AssertionError(f"no check for mixer {name!r}")


@pytest.mark.parametrize(("name", "n", "options"), mixer_cases())
def test_num_logits_match_spec(name, n, options):
    """r of SPEC §2's table; ``init_logits`` has that length and gives a finite H."""
    p = options.get("grassmann_rank")
    expected = {
        "identity": 0,
        "unconstrained": n * n,
        "sinkhorn": n * n,
        "permutation": math.factorial(n),
        "kronecker": int(math.log2(n)),
        "spectral": (n - 1) ** 2,
        "transport": (n - 1) ** 2,
        "stiefel": n * (n - 1) // 2,
        "grassmann": p * (n - 1 - p) + p * (p - 1) // 2 if p else 0,
    }[name]
    mixer = build_mixer(name, n, **options)
    assert mixer.num_logits == expected
    if name == "grassmann":
        assert mixer.num_logits <= p * (n - 1)
    init = mixer.init_logits()
    assert init.shape == (expected,) and mixer(init).isfinite().all()


@pytest.mark.parametrize(
    ("alias", "target"), sorted(ALIASES.items()), ids=[f"{a}-is-{t}" for a, t in sorted(ALIASES.items())]
)
def test_paper_aliases(alias, target):
    n = 4
    aliased, canonical = build_mixer(alias, n), build_mixer(target, n)
    assert type(aliased) is type(canonical)
    assert type(build_mixer(alias.upper(), n)) is type(canonical)
    theta = torch.randn(8, canonical.num_logits)
    torch.testing.assert_close(aliased(theta), canonical(theta), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    pytest.param("identity", 3, {}, id="identity-n3"),
    pytest.param("unconstrained", 3, {}, id="unconstrained-n3"),
    pytest.param("sinkhorn", 3, {"sinkhorn_backward": "implicit"}, id="sinkhorn-implicit-n3"),
    pytest.param("sinkhorn", 3, {"sinkhorn_backward": "unrolled"}, id="sinkhorn-unrolled-n3"),
    pytest.param("sinkhorn", 3, {"sinkhorn_backward": "unrolled", "sinkhorn_eps": 1e-6}, id="sinkhorn-deepseek-eps-n3"),
    pytest.param("permutation", 3, {}, id="permutation-n3"),
    pytest.param("kronecker", 4, {}, id="kronecker-n4"),
    pytest.param("spectral", 4, {}, id="spectral-n4"),
    pytest.param("transport", 4, {}, id="transport-n4"),
    pytest.param("stiefel", 4, {"cayley_method": "solve"}, id="stiefel-solve-n4"),
    pytest.param("stiefel", 4, {"cayley_method": "iterative", "cayley_iters": 40}, id="stiefel-iterative-n4"),
    pytest.param("grassmann", 4, {"grassmann_rank": 1}, id="grassmann-n4-p1"),
    pytest.param("grassmann", 4, {"grassmann_rank": 2}, id="grassmann-n4-p2"),
    pytest.param("grassmann", 4, {"grassmann_rank": 3}, id="grassmann-n4-p3"),
]


@pytest.mark.parametrize(("name", "n", "options"), GRADCHECK_CASES)
def test_gradcheck_float64(name, n, options):
    mixer = build_mixer(name, n, **options)
    if mixer.num_logits == 0:
        assert mixer(torch.zeros(2, 0, dtype=torch.float64)).dtype == torch.float64
        return
    theta = torch.randn(2, mixer.num_logits, dtype=torch.float64)
    if options.get("cayley_method") == "iterative":
        theta = theta * 0.3  # the fixed point needs ‖θ − θᵀ‖₂ < 2
    theta.requires_grad_()
    assert mixer(theta).dtype == torch.float64
    assert torch.autograd.gradcheck(mixer, (theta,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 10.0], ids=["theta1", "theta10"])
@pytest.mark.parametrize("n", STREAMS, ids=[f"n{n}" for n in STREAMS])
def test_sinkhorn_implicit_matches_unrolled(n, scale):
    theta = (torch.rand(16, n * n, dtype=torch.float64) * 2 - 1) * scale
    upstream = torch.randn(16, n, n, dtype=torch.float64)
    values, grads = [], []
    for backward in ("implicit", "unrolled"):
        leaf = theta.clone().requires_grad_()
        h = build_mixer("sinkhorn", n, sinkhorn_backward=backward)(leaf)
        (h * upstream).sum().backward()
        values.append(h.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.05, 4.0], ids=["near-identity", "far"])
def test_compiled_sinkhorn_polish_stops_where_eager_does(scale):
    """Under torch.compile on CPU the rounds test once, through torch.cond, whether the first left P within the
    Newton polish's basin, and the polish tests convergence every NEWTON_CHECKPOINT steps: near the identity
    the rounds hand over at once and the polish stops at its first checkpoint; far from it (θ = 4I + 4·N, a
    first-round row error > NEWTON_BASIN, and 2 steps leave one ≫ 1e-15) both take the branch with the rest.
    Both equal eager mode, which tests after every fourth round and any step, to float64 rounding, and are
    doubly stochastic to it. Compiled with dynamic=True, where dynamo makes floats read from defaults or
    globals symbolic and torch.cond rejects them."""
    from hf_jpmhc.models.sinkhorn import NEWTON_BASIN, NEWTON_CHECKPOINT, sinkhorn_iterate

    generator = torch.Generator().manual_seed(0)
    theta = 4 * torch.eye(4, dtype=torch.float64) + scale * torch.randn(64, 4, 4, generator=generator, dtype=torch.float64)
    two_steps = sinkhorn_iterate(theta, 20, 0.0, NEWTON_CHECKPOINT)
    first_round = sinkhorn_iterate(theta, 1)
    assert ((two_steps.sum(-1) - 1).abs().max() > 1e-12) == (scale > 1), "the test no longer reaches both branches"
    assert ((first_round.sum(-1) - 1).abs().max() > NEWTON_BASIN) == (scale > 1), "nor both branches of the rounds"
    compiled = torch.compile(sinkhorn_iterate, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.inference_mode():
        h = compiled(theta, 20, 0.0, 8)
    torch.testing.assert_close(h, sinkhorn_iterate(theta, 20, 0.0, 8), rtol=0, atol=1e-14)
    torch.testing.assert_close(h.sum(-1), torch.ones(64, 4, dtype=torch.float64), rtol=0, atol=1e-14)


def skew_norm_logits(n: int, norm: float) -> torch.Tensor:
    """Stiefel logits θ (8, n(n−1)/2) whose skew A = θ − θᵀ has ‖A‖₂ = ``norm`` in every batch entry."""
    mixer = build_mixer("stiefel", n)
    theta = torch.randn(8, mixer.num_logits, dtype=torch.float64)
    upper = torch.zeros(8, n, n, dtype=torch.float64)
    index = torch.triu_indices(n, n, offset=1)
    upper[:, index[0], index[1]] = theta
    spectral_norm = torch.linalg.matrix_norm(upper - upper.transpose(-1, -2), ord=2)
    return theta * (norm / spectral_norm).unsqueeze(-1)


@pytest.mark.parametrize("norm", [0.5, 1.0, 1.5], ids=["normA0.5", "normA1", "normA1.5"])
@pytest.mark.parametrize("n", [2, 4, 8], ids=["n2", "n4", "n8"])
def test_cayley_iterative_matches_solve(n, norm):
    """The fixed point converges as (‖A‖₂/2)^k: enough steps for 1e-12, then values and gradients agree."""
    iters = math.ceil(math.log(1e-12) / math.log(norm / 2))
    theta = skew_norm_logits(n, norm)
    upstream = torch.randn(8, n, n, dtype=torch.float64)
    values, grads = [], []
    for method in ("solve", "iterative"):
        leaf = theta.clone().requires_grad_()
        h = build_mixer("stiefel", n, cayley_method=method, cayley_iters=iters)(leaf)
        (h * upstream).sum().backward()
        values.append(h.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-8)


def test_cayley_iterative_default_steps_at_small_norm():
    """The default 12 steps are exact to float32 while ‖A‖₂ ≤ 0.5 (error ≈ 0.25¹² ≈ 6e-8)."""
    theta = skew_norm_logits(4, 0.5).float()
    iterative = build_mixer("stiefel", 4, cayley_method="iterative")(theta)
    torch.testing.assert_close(iterative, build_mixer("stiefel", 4)(theta), rtol=0, atol=1e-6)
    assert orthogonality_residual(iterative) <= TOL


@pytest.mark.parametrize("n", [2, 4, 8, 16], ids=["n2", "n4", "n8", "n16"])
def test_kronecker_is_the_product_of_its_factors(n):
    """H = U_1 ⊗ … ⊗ U_K with U_k = [[p_k, 1 − p_k], [1 − p_k, p_k]], U_1 outermost, checked with torch.kron."""
    theta = torch.randn(3, n.bit_length() - 1) * 3
    p = torch.sigmoid(theta)
    for h, row in zip(build_mixer("kronecker", n)(theta), p):
        expected = torch.ones(1, 1)
        for pk in row:
            expected = torch.kron(expected, torch.stack([torch.stack([pk, 1 - pk]), torch.stack([1 - pk, pk])]))
        torch.testing.assert_close(h, expected, rtol=1e-6, atol=0)

# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------


RANK_RANGE = r"grassmann_rank must be in 1\.\.num_streams-1 = 1\.\.3"


@pytest.mark.parametrize(
    ("name", "n", "options", "match"),
    [
        pytest.param("permutation", 7, {}, r"mixer='permutation' needs num_streams <= 6.*got 7", id="permutation-n7"),
        pytest.param("mhc-lite", 8, {}, r"mixer='permutation' needs num_streams <= 6.*got 8", id="mhc-lite-n8"),
        pytest.param("kronecker", 3, {}, r"mixer='kronecker' needs num_streams to be a power of 2", id="kronecker-n3"),
        pytest.param("kromhc", 6, {}, r"mixer='kronecker' needs num_streams to be a power of 2.*got 6", id="kromhc-n6"),
        pytest.param("kronecker", 12, {}, r"power of 2.*got 12", id="kronecker-n12"),
        pytest.param("kronecker", 1, {}, r"power of 2.*got 1", id="kronecker-n1"),
        pytest.param("grassmann", 4, {"grassmann_rank": 0}, rf"{RANK_RANGE}, got 0", id="grassmann-p0"),
        pytest.param("grassmann", 4, {"grassmann_rank": 4}, rf"{RANK_RANGE}, got 4", id="grassmann-p=n"),
        pytest.param("grassmann", 4, {"grassmann_rank": -1}, rf"{RANK_RANGE}, got -1", id="grassmann-p-1"),
        pytest.param("grassmann", 1, {}, r"needs num_streams >= 2", id="grassmann-n1"),
        pytest.param("sinkhorn", 0, {}, r"num_streams must be a positive integer", id="sinkhorn-n0"),
    ],
)
def test_invalid_mixer_raises(name, n, options, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(name, n, **options)


@pytest.mark.parametrize("name", ["foo", "mhc2", "orthogonal", ""])
def test_unknown_mixer_lists_valid_names(name):
    with pytest.raises(ValueError, match=f"mixer={name!r} is not a known mixer") as error:
        build_mixer(name, 4)
    for valid in [*MIXERS, *ALIASES]:
        assert valid in str(error.value)


# ----------------------------------------------------------------------------------------------------
# orientation (SPEC §1): X' = Hᵀ X + post ⊗ f
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unconstrained", "sinkhorn", "stiefel"])
def test_orientation_with_non_symmetric_mixer(name):
    """X'_t = Σ_s H[s, t] X_s + post_t f, checked entry by entry against a double loop, per token."""
    n, hidden = 4, 8
    hc = HyperConnection(hidden, build_mixer(name, n), dynamic=True)
    with torch.no_grad():  # non-trivial, input-dependent coefficients
        hc.phi.normal_()
        hc.bias.normal_()
        hc.alpha.fill_(1.0)
    streams = torch.randn(2, 3, n, hidden)  # (B, T, n, C)
    branch = torch.randn(2, 3, hidden)  # f (B, T, C)
    pre, post, mix = hc.coefficients(streams)
    assert (mix - mix.transpose(-1, -2)).abs().max() > 0.1, "H must be non-symmetric for this test to mean anything"

    u, post_read, mix_read = hc.read(streams)
    out = hc.write(streams, branch, post_read, mix_read)
    for b in range(2):
        for i in range(3):
            expected_u = sum(pre[b, i, s] * streams[b, i, s] for s in range(n))
            torch.testing.assert_close(u[b, i], expected_u, rtol=1e-6, atol=1e-6)
            for t in range(n):
                expected = sum(mix[b, i, s, t] * streams[b, i, s] for s in range(n)) + post[b, i, t] * branch[b, i]
                torch.testing.assert_close(out[b, i, t], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mean_preserving_is_declared_exactly_where_the_columns_sum_to_one(name):
    """``Mixer.mean_preserving`` (Hᵀ1 = 1 for every θ, relied on by the degeneration check of the dynamics
    monitor) agrees with H itself at random logits."""
    mixer = build_mixer(name, 4)
    h = mixer(torch.randn(64, mixer.num_logits, dtype=torch.float64) * 2)
    columns_sum_to_one = bool(torch.allclose(h.sum(-2), torch.ones(64, 4, dtype=torch.float64), atol=1e-6))
    assert mixer.mean_preserving == columns_sum_to_one
