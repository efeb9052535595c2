"""Every op of hf_jpmhc.ops — its Triton kernel and the models' torch code — against the standalone reference in
``ops/<op>/naive.py``: outputs and gradients over a shape table.

Triton runs on CPU under TRITON_INTERPRET=1 (set by tests/conftest.py); its cases are skipped only where triton
cannot be imported, and failed instead under CI=true. Shapes: n ∈ {2, 4, 8}, C not a power of two, token counts
that are not multiples of any block size.
"""

from __future__ import annotations

import pytest
import torch

from hf_jpmhc import ops
from hf_jpmhc.models.cayley import skew_basis, skew_from_logits
from hf_jpmhc.ops.cayley.naive import cayley_reference
from hf_jpmhc.ops.coefficients.naive import hc_coefficients_reference
from hf_jpmhc.ops.collapse.naive import collapse_streams_reference
from hf_jpmhc.ops.sinkhorn.naive import sinkhorn_reference
from hf_jpmhc.ops.stream_update.naive import update_streams_reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "torch"]
# (lead shape (B, T), n, C): C = 300 crosses several C blocks and the K loop; 7, 9, 10 rows are ragged blocks.
SHAPES = [((2, 5), 2, 24), ((1, 7), 4, 300), ((3, 3), 8, 20)]
SHAPE_IDS = [f"B{b}T{t}-n{n}-C{c}" for (b, t), n, c in SHAPES]
# dtype of the streams → (atol, rtol), relative to each tensor's scale. bf16 kernels accumulate in fp32 and
# round once on the store, so they are compared with the fp32 reference run on the same (bf16-valued) inputs.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


def _grads(fn, *inputs, upcast: bool = False):
    """Output and the gradients of <output, fixed random cotangent> w.r.t. every input (fp32 inputs if ``upcast``)."""
    inputs = [(x.float() if upcast else x).detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum() for i, o in enumerate(outs))
    loss.backward()
    return outs, [x.grad for x in inputs]


def _assert_same(fused, reference, dtype=torch.float32, tolerances=None):
    """Outputs and gradients agree within the dtype's tolerance, scaled by the reference's magnitude."""
    atol, rtol = tolerances or TOLERANCES[dtype]
    (f_outs, f_grads), (r_outs, r_grads) = fused, reference
    for got, want in zip(f_outs + tuple(f_grads), r_outs + tuple(r_grads), strict=True):
        assert got.dtype == want.dtype or dtype != torch.float32
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("lead", "n", "c"), SHAPES, ids=SHAPE_IDS)
def test_collapse_matches_reference(lead, n, c, dtype, backend):
    streams, weights = torch.randn(*lead, n, c).to(dtype), torch.rand(*lead, n)
    fused = _grads(lambda x, w: ops.collapse_streams(x, w, kernel_backend=backend), streams, weights)
    _assert_same(fused, _grads(collapse_streams_reference, streams, weights, upcast=True), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("lead", "n", "c"), SHAPES, ids=SHAPE_IDS)
def test_stream_update_matches_reference(lead, n, c, dtype, backend):
    streams, branch = torch.randn(*lead, n, c).to(dtype), torch.randn(*lead, c).to(dtype)
    mixer, post = torch.randn(*lead, n, n), torch.rand(*lead, n) * 2  # non-symmetric H: checks the orientation
    inputs = (streams, mixer, post, branch)
    fused = _grads(lambda x, h, p, f: ops.update_streams(x, h, p, f, kernel_backend=backend), *inputs)
    _assert_same(fused, _grads(update_streams_reference, *inputs, upcast=True), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_update_orientation(backend):
    """X'_t = Σ_s H[s, t] X_s: with a permutation-like H the update moves stream 0 into stream 1."""
    streams = torch.randn(1, 1, 2, 3)
    mixer = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # H[0, 1] = 1
    out = ops.update_streams(streams, mixer, torch.zeros(2), torch.zeros(1, 1, 3), kernel_backend=backend)
    torch.testing.assert_close(out[0, 0, 1], streams[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 0], torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("lead", "n", "c"), SHAPES, ids=SHAPE_IDS)
def test_coefficients_match_reference(lead, n, c, dtype, backend):
    r = n * n
    split = (n, n, r)
    streams = torch.randn(*lead, n, c).to(dtype)
    phi, alpha, bias = torch.randn(2 * n + r, n * c) * 0.05, torch.tensor([0.5, 0.3, 0.7]), torch.randn(2 * n + r)

    def run(function, up=False):
        return _grads(lambda x, p, a, b: function(x, p, a, b, split, 1e-3, 1e-6), streams, phi, alpha, bias, upcast=up)

    fused = run(lambda *args: ops.hc_coefficients(*args, kernel_backend=backend))
    _assert_same(fused, run(hc_coefficients_reference, up=True), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefficients_backward_with_a_frozen_input(backend):
    """With Φ frozen (LoRA, say) or the streams frozen, the backward (which then skips that input's pass over X)
    still gives the other input's gradient equal to the reference's."""
    n, c, split = 2, 24, (2, 2, 4)
    streams, phi = torch.randn(2, 5, n, c), torch.randn(8, n * c) * 0.05
    alpha, bias = torch.tensor([0.5, 0.3, 0.7]), torch.randn(8)
    for trainable in ("streams", "phi"):
        grads = {}
        for name, function in (("op", lambda *a: ops.hc_coefficients(*a, kernel_backend=backend)),
                               ("reference", hc_coefficients_reference)):  # fmt: skip
            x, p = streams.clone().requires_grad_(trainable == "streams"), phi.clone().requires_grad_(trainable == "phi")
            pre, post, z_res = function(x, p, alpha, bias, split, 0.0, 1e-6)
            (pre.sum() + post.square().sum() + z_res.sin().sum()).backward()
            grads[name] = (x.grad, p.grad)
        needed = 0 if trainable == "streams" else 1
        torch.testing.assert_close(grads["op"][needed], grads["reference"][needed], atol=2e-5, rtol=1e-5)


# The padded rows of a block are −∞ by design; numpy (the interpreter) warns on their masked log(0).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_matches_reference(n, backend):
    """The implicit backward against autograd through the reference's rounds and Newton steps (equal at the
    fixed point)."""
    theta = torch.randn(2, 9, n, n) * 3  # 18 matrices: a ragged last block of 16
    fused = _grads(lambda t: ops.sinkhorn(t, 20, 8, kernel_backend=backend), theta)
    _assert_same(fused, _grads(lambda t: sinkhorn_reference(t, 20, 8), theta))
    p = fused[0][0]
    assert (p.sum(-1) - 1).abs().max() < 1e-5 and (p.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_rounds_match_unpolished_reference(n):
    """The fused rounds alone equal the reference without Newton (same maths, same iteration count)."""
    from hf_jpmhc.ops.sinkhorn.fused import sinkhorn_rounds_triton

    theta = torch.randn(5, n, n) * 3
    torch.testing.assert_close(sinkhorn_rounds_triton(theta, 7).exp(), sinkhorn_reference(theta, 7, 0), atol=1e-6,
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_cayley_matches_reference(n, backend):
    """The iterative fixed point against the exact solve, where it converges (‖A/2‖ < 1)."""
    skew = skew_from_logits(torch.randn(2, 3, n * (n - 1) // 2) * 0.3 / n, skew_basis(n), n)
    fused = _grads(lambda a: ops.cayley(a, 16, kernel_backend=backend), skew)
    _assert_same(fused, _grads(cayley_reference, skew))
    h = fused[0][0]
    torch.testing.assert_close(h.transpose(-1, -2) @ h, torch.eye(n).expand_as(h), atol=1e-5, rtol=0)


def test_invalid_backend_names_the_field():
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        ops.collapse_streams(torch.randn(1, 2, 3), torch.rand(1, 2), kernel_backend="cuda")


def test_auto_uses_torch_on_cpu():
    assert ops.resolve_backend("auto", torch.randn(2)) == "torch"
