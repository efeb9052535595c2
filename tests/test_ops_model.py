"""The kernels inside the model, the recompute switch, the implicit backward's memory and the compiled torch path."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.models.hyper_connection import HyperConnection
from hf_jpmhc.models.mixers import build_mixer
from tests.conftest import tiny_llama_kwargs


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _perturbed_model(**config) -> JPmHCForCausalLM:
    """A tiny model with non-trivial (non-init) hyper-connection weights, so every path carries signal."""
    torch.manual_seed(0)
    model = JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(), num_streams=4, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name or "stream_collapse" in name:
                p.add_(torch.randn_like(p) * (0.02 if p.ndim == 2 else 0.3))
    return model


def _assert_same_run(reference, candidate, ids, atol=1e-5):
    logits_r, grads_r = _loss_and_grads(reference, ids)
    logits_c, grads_c = _loss_and_grads(candidate, ids)
    torch.testing.assert_close(logits_c, logits_r, atol=atol, rtol=1e-5)
    assert grads_c.keys() == grads_r.keys()
    for name in grads_r:
        scale = max(1.0, grads_r[name].abs().max().item())
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=atol * scale, rtol=1e-4, msg=name)


@pytest.mark.triton  # skipped where triton cannot be imported, failed instead under CI=true (conftest)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked log(0) of the padded Sinkhorn rows in numpy
@pytest.mark.parametrize(("mixer", "options"), [("sinkhorn", {}), ("stiefel", {"cayley_method": "iterative"})])
def test_triton_backend_matches_torch_in_the_model(mixer, options):
    ids = torch.randint(3, 128, (2, 6))
    reference = _perturbed_model(mixer=mixer, kernel_backend="torch", **options)
    fused = _perturbed_model(mixer=mixer, kernel_backend="triton", **options)
    _assert_same_run(reference, fused, ids)


@pytest.mark.parametrize("mixer", ["stiefel", "sinkhorn", "kronecker"])
def test_recompute_gives_the_same_gradients(mixer):
    ids = torch.randint(3, 128, (2, 12))
    _assert_same_run(_perturbed_model(mixer=mixer), _perturbed_model(mixer=mixer, hc_recompute=True), ids, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Bytes saved for backward while ``fn`` runs (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _hc_step_saved_bytes(**mixer_options) -> int:
    hc = HyperConnection(32, build_mixer("sinkhorn", 4, **mixer_options))
    streams = torch.randn(2, 16, 4, 32, requires_grad=True)
    return _saved_bytes(lambda: hc.write(streams, torch.randn(2, 16, 32), *hc.read(streams)[1:]))


def test_implicit_sinkhorn_memory_does_not_grow_with_iterations():
    one, many = _hc_step_saved_bytes(sinkhorn_iters=1), _hc_step_saved_bytes(sinkhorn_iters=20)
    assert many == one
    unrolled = _hc_step_saved_bytes(sinkhorn_iters=20, sinkhorn_backward="unrolled")
    assert unrolled > 2 * many  # the control: unrolled autograd keeps every round


def _saved_stream_storages(model, ids) -> int:
    """How many distinct storages written by a stream update autograd keeps for one training forward."""
    storages = set()

    def pack(t):
        base = t if t._base is None else t._base
        if type(base.grad_fn).__name__ == "StreamUpdateBackward":
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return len(storages)


def test_recompute_stores_the_streams_once_per_layer():
    """mHC's recomputation: each layer keeps only its stream input (the last layer's output for the collapse);
    without it, the mid-layer streams between the attention and MLP sites are kept too."""
    ids = torch.randint(3, 128, (2, 16))
    layers = tiny_llama_kwargs()["num_hidden_layers"]
    # layer 0's input is the expanded embedding: L − 1 layer inputs + the streams entering the collapse
    assert _saved_stream_storages(_perturbed_model(mixer="sinkhorn", hc_recompute=True), ids) == layers
    assert _saved_stream_storages(_perturbed_model(mixer="sinkhorn"), ids) == 2 * layers


def test_recompute_under_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 128, (2, 12))
    candidate = _perturbed_model(mixer="stiefel", hc_recompute=True)
    candidate.gradient_checkpointing_enable()
    _assert_same_run(_perturbed_model(mixer="stiefel"), candidate, ids, atol=1e-6)


@pytest.mark.parametrize(("mixer", "options"), [("stiefel", {}), ("sinkhorn", {}), ("kronecker", {})])
def test_torch_path_has_no_graph_breaks(mixer, options):
    """torch.compile traces a hyper-connection read + write as one graph (dynamo only, no codegen: cheap)."""
    hc = HyperConnection(16, build_mixer(mixer, 4, **options), kernel_backend="torch")

    def step(streams, branch):
        u, post, h = hc.read(streams)
        return hc.write(streams, branch * u, post, h)

    explanation = torch._dynamo.explain(step)(torch.randn(2, 3, 4, 16), torch.randn(2, 3, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_hyper_connection_rejects_unknown_backend():
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        HyperConnection(8, build_mixer("stiefel", 2), kernel_backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_cpu_path_backwards_match_autograd_of_the_references(backend):
    """HyperConnectionRead / StreamUpdate (hand-written backwards) equal autograd through the standalone references
    (ops/*/naive.py), with the torch backend's passes and with the compiled backend's (C++ loops, inductor); the
    read also as the final StreamCollapse uses it (pre-type weights only, one α)."""
    from hf_jpmhc.models.hc_kernels import KERNELS
    from hf_jpmhc.models.stream_passes import HyperConnectionRead, StreamUpdate
    from hf_jpmhc.ops.coefficients.naive import hc_coefficients_reference as dynamic_coefficients
    from hf_jpmhc.ops.collapse.naive import collapse_streams_reference as collapse_streams
    from hf_jpmhc.ops.stream_update.naive import update_streams_reference as update_streams

    passes = KERNELS[backend].passes

    split = (4, 4, 6)
    inputs = [torch.randn(2, 3, 4, 5), torch.randn(14, 20), torch.rand(3), torch.randn(14)]

    def reference(x, phi, alpha, bias):
        pre, post, z_res = dynamic_coefficients(x, phi, alpha, bias, split, 0.01, 1e-6)
        return collapse_streams(x, pre), post, z_res

    def fused(x, phi, alpha, bias):
        return HyperConnectionRead.apply(x, phi, alpha, bias, split, 0.01, 1e-6, passes)

    def update(x, mixer, post, branch):
        return StreamUpdate.apply(x, mixer, post, branch, passes)

    def head_reference(x, phi, alpha, bias):
        return collapse_streams(x, dynamic_coefficients(x, phi, alpha.expand(3), bias, (4, 0, 0), 0.01, 1e-6)[0])

    def head_fused(x, phi, alpha, bias):
        return HyperConnectionRead.apply(x, phi, alpha.expand(3), bias, (4, 0, 0), 0.01, 1e-6, passes)[0]

    head_inputs = [torch.randn(2, 3, 4, 5), torch.randn(4, 20), torch.rand(1), torch.randn(4)]
    # the static (n,) post and (n, n) mixer broadcast over tokens: their gradients sum over them
    update_inputs = [torch.randn(2, 3, 4, 5), torch.randn(4, 4), torch.rand(4), torch.randn(2, 3, 5)]
    for fn_ref, fn_new, xs in [(reference, fused, inputs), (head_reference, head_fused, head_inputs),
                               (update_streams, update, update_inputs)]:  # fmt: skip
        results = []
        for fn in (fn_ref, fn_new):
            leaves = [x.clone().requires_grad_(True) for x in xs]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
            results.append(outs + torch.autograd.grad(outs, leaves, cotangents))
        for got, want in zip(*reversed(results), strict=True):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("n", "channels", "tokens"), [(2, 5, 7), (3, 37, 33), (4, 64, 21), (8, 19, 18), (4, 67, 2)])
def test_cpu_kernels_match_the_references(n, channels, tokens):
    """Each hand-fused C++ loop of kernel_backend="compiled" (hf_jpmhc.ops.cpu.NativePasses) against the standalone
    reference (ops/*/naive.py) where the pass is an op, else the torch backend's pass of the same name (the parts
    of the hand-written backwards): C not a multiple of the vector tile, tokens not a multiple of the blocks or
    fewer than FEW_TOKENS (decoding: Φ read in place), two threads (the read's ∂Φ sums per-thread buffers). The
    whole read at inference with the mixers it has in C++: Sinkhorn near the identity (the rounds hand over to the
    Newton polish) and far from it. The extension must build here: a silent fallback would test nothing."""
    from hf_jpmhc.models.mixers import build_mixer
    from hf_jpmhc.models.stream_passes import StreamPasses
    from hf_jpmhc.ops import cpu
    from hf_jpmhc.ops.coefficients.naive import hc_coefficients_reference
    from hf_jpmhc.ops.collapse.naive import collapse_streams_reference
    from hf_jpmhc.ops.stream_update.naive import update_streams_reference

    def read_streams_reference(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps, mixer=None):
        pre, post, z_res = hc_coefficients_reference(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)
        return collapse_streams_reference(streams, pre), post, z_res if mixer is None else mixer(z_res)

    references = {"collapse_streams": collapse_streams_reference, "update_streams": update_streams_reference,
                  "read_streams": read_streams_reference}  # fmt: skip
    assert cpu.load() is not None, "the C++ CPU kernels did not build (see the warning)"
    g = torch.Generator().manual_seed(n * channels)
    lead, m = (tokens // 3, 3) if tokens % 3 == 0 else (tokens, 1), 2 * n + n * n

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    streams, branch, grad_out = randn(*lead, n, channels), randn(*lead, channels), randn(*lead, n, channels)
    mixer, post, pre = randn(*lead, n, n), randn(*lead, n).sigmoid() * 2, randn(*lead, n).sigmoid()
    phi, kappa, gz = randn(m, n * channels) * 0.1, randn(*lead, 1), randn(*lead, m)
    cases = {
        "projection_and_rstd": (streams, phi, 1e-6),
        "collapse_streams": (streams, pre),
        "row_dot": (branch, streams),
        "read_backward_streams": (streams, pre, branch, kappa, gz, phi),
        "update_streams": (streams, mixer, post, branch),
        "stream_update_grads": (streams, mixer, post, branch, grad_out),
    }
    for name, logit_scale in (("sinkhorn", 1.0), ("sinkhorn", 3.0), ("stiefel", 1.0), ("kronecker", 1.0), (None, 1.0)):
        if name == "kronecker" and n & (n - 1):
            continue  # KromHC needs n = 2^K
        read_mixer = build_mixer(name, n) if name else None
        split_sizes = (n, n, read_mixer.num_logits) if name else (n, 0, 0)  # no mixer: the stream collapse's read
        rows = sum(split_sizes)
        bias = torch.cat([randn(2 * n), read_mixer.init_logits() + randn(rows - 2 * n)]) if name else randn(n)
        read_args = (streams, randn(rows, n * channels) * 0.1, torch.rand(3, generator=g) * logit_scale,
                     bias * logit_scale, split_sizes, 0.01, 1e-6, read_mixer)  # fmt: skip
        cases[f"read_streams {name} ×{logit_scale}"] = read_args
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, args in cases.items():
            function = name.split()[0]
            reference = references.get(function, getattr(StreamPasses, function))
            got, want = getattr(cpu.NativePasses, function)(*args), reference(*args)
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    finally:
        torch.set_num_threads(threads)
    native = cpu.NativePasses
    assert native.update_streams(streams.double(), mixer.double(), post.double(), branch.double()) is None  # falls back
    assert native.update_streams(streams, mixer[0, 0], post, branch) is None  # a mixer shared by all tokens
    grassmann = build_mixer("grassmann", n)  # no C++ maths: the read falls back
    rows = 2 * n + grassmann.num_logits
    read_args = (streams, randn(rows, n * channels), torch.ones(3), randn(rows), (n, n, rows - 2 * n), 0.0, 1e-6,
                 grassmann)  # fmt: skip
    assert native.read_streams(*read_args) is None
    with pytest.raises(RuntimeError, match="one entry per token"):  # the loops check sizes themselves too
        cpu.load().collapse(streams, pre[..., :1].contiguous())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocated_buffers():
    """Two 64 MiB buffers allocated, touched and freed at every "step": with glibc's defaults each step maps them
    afresh (a page fault per 4 KiB); after keep_freed_memory() the heap grows for a few steps (aligned blocks
    fragment it) and then serves them already mapped. In subprocesses: the setting is process-wide."""
    script = """
import resource, sys, torch
from hf_jpmhc.ops.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for step in range(12):
    if step == 8:  # the last four steps
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(2**24), torch.ones(2**24)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                       text=True).stdout) for mode in ("default", "keep")}  # fmt: skip
    assert faults["default"] >= 4 * 2 * 2**14, faults  # 4 steps × 2 buffers × 16384 pages of 4 KiB
    assert faults["keep"] < 200, faults


def test_compiled_stream_update_matches_eager():
    """Under torch.compile, update_streams takes its broadcast-and-reduce form: same numbers as the matmul."""
    from hf_jpmhc.models.stream_passes import update_streams

    streams, mixer = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 4)
    post, branch = torch.rand(2, 3, 4), torch.randn(2, 3, 8)
    compiled = torch.compile(update_streams, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(streams, mixer, post, branch), update_streams(streams, mixer, post, branch))


@pytest.mark.parametrize(("mixer", "options"), [("stiefel", {}), ("sinkhorn", {}), ("kronecker", {}),
                                                ("sinkhorn", {"hc_recompute": True}), ("stiefel", {"dynamic": False})])
def test_compiled_backend_matches_torch_in_the_model(mixer, options):
    """kernel_backend="compiled" (C++ and inductor-compiled per-token passes, the mixer compiled with its backward)
    trains like the eager torch path."""
    from hf_jpmhc.models.hc_kernels import _compiled_forward

    ids = torch.randint(3, 128, (2, 12))
    reference = _perturbed_model(mixer=mixer, kernel_backend="torch", **options)
    _compiled_forward.cache_clear()
    _assert_same_run(reference, _perturbed_model(mixer=mixer, kernel_backend="compiled", **options), ids)
    # the mixer's forward, compiled once for all sites; static coefficients mix one θ per site, uncompiled
    assert _compiled_forward.cache_info().currsize == int(options.get("dynamic", True))


@pytest.mark.parametrize("mixer", ["sinkhorn", "grassmann"])
def test_compiled_backend_matches_torch_at_inference(mixer):
    """Without autograd, kernel_backend="compiled" runs each read (coefficients, mixer, collapse) as one call — the
    C++ read for the mixers it has (Sinkhorn), else one inductor-compiled function (Grassmann) — and each write as
    one C++ call: the same logits and greedy tokens as the eager torch path, in the prefill and cached decoding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs cached by earlier tests for the same shapes would hide the compile counted below
    ids = torch.randint(3, 128, (2, 7))
    runs, graphs = [], []
    for backend in ("torch", "compiled"):
        model = _perturbed_model(mixer=mixer, kernel_backend=backend).eval()
        with torch.no_grad():
            runs.append((model(ids).logits, model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)))
        graphs.append(counters["stats"]["unique_graphs"])
    if mixer == "sinkhorn":
        assert graphs[1] == graphs[0], "the C++ read and write did not take every site: inductor compiled a fallback"
    else:
        assert graphs[1] > graphs[0], "kernel_backend='compiled' compiled nothing at inference"
    (logits_eager, tokens_eager), (logits_compiled, tokens_compiled) = runs
    torch.testing.assert_close(logits_compiled, logits_eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens_compiled, tokens_eager)


def test_compiled_small_solve_matches_lapack():
    """Under torch.compile, solve_small eliminates without pivoting; on the mixers' systems (symmetric part
    positive definite) it agrees with LAPACK, and the Cayley transform stays orthogonal at |θ| ~ 1e3."""
    from hf_jpmhc.models.cayley import cayley, solve_small

    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(5, 4, 4, generator=generator, dtype=torch.float64), dim=-1)
    system = torch.diag_embed(p.sum(-1)) - (p / p.sum(-2).unsqueeze(-2)) @ p.mT + 1  # Sinkhorn's Schur complement
    rhs = torch.randn(5, 4, 2, generator=generator, dtype=torch.float64)
    skew = torch.randn(5, 4, 4, generator=generator, dtype=torch.float64) * 1e3
    skew = skew - skew.mT
    compiled_solve = torch.compile(solve_small, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled_solve(system, rhs), torch.linalg.solve(system, rhs), rtol=1e-9, atol=1e-9)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(compiled_solve(eye - skew / 2, eye + skew / 2), cayley(skew), rtol=1e-8, atol=1e-8)
    q = torch.compile(cayley, backend="aot_eager", fullgraph=True)(skew.float())
    torch.testing.assert_close(q @ q.mT, torch.eye(4).expand_as(q), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_compiled_backend_is_traced_into_an_enclosing_compile(grad):
    """kernel_backend="compiled" under the user's own torch.compile: its C++ loops are registered torch ops, so
    dynamo traces them into the one graph (no break, no bypass) and the result equals eager."""
    hc = HyperConnection(16, build_mixer("sinkhorn", 4), kernel_backend="compiled")
    with torch.no_grad():
        hc.phi.normal_(0, 0.1), hc.bias.add_(torch.randn(hc.bias.shape) * 0.3)

    def step(streams, branch):
        u, post, h = hc.read(streams)
        return hc.write(streams, branch * u, post, h)

    graphs = []

    def capture(graph_module, inputs):
        graphs.append(graph_module)
        return graph_module.forward

    streams, branch = torch.randn(2, 3, 4, 16, requires_grad=grad), torch.randn(2, 3, 16)
    with torch.set_grad_enabled(grad):
        compiled = torch.compile(step, backend=capture, fullgraph=True)(streams, branch)
        torch.testing.assert_close(compiled, step(streams, branch), atol=1e-6, rtol=1e-6)
    called = {str(node.target) for graph in graphs for module in graph.modules()  # with the autograd.Function bodies
              if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("hf_jpmhc.") for target in called), sorted(called)


def test_compiled_backend_keeps_forward_hooks_on_the_mixer():
    """A forward hook on a mixer still sees its forward run under kernel_backend="compiled" (the fused C++ read
    and the compiled mixer would bypass it), and the model's outputs do not change."""
    ids = torch.randint(3, 128, (2, 7))
    reference = _perturbed_model(mixer="sinkhorn", kernel_backend="torch").eval()
    model = _perturbed_model(mixer="sinkhorn", kernel_backend="compiled").eval()
    seen = []
    model.model.layers[0].attn_hc.mixer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert seen == [torch.Size([2, 7, 4, 4])]
