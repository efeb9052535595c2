"""Empirical Jacobian spectrum of the stream map X_L ← X_0 (SPEC §4): exact, or by randomised probing.

Both work on any ``stream_map``: a function from streams (B, …) to streams (B, …) that treats the leading
batch axis independently (true of every decoder stack: batch items never interact). The batch axis then
carries the probes, so one forward and one backward give many vector-Jacobian products at once, through
any autograd Function (the mixers' implicit backwards included).

* ``exact_jacobian``: all N rows by N simultaneous VJPs (N = the stream size per item; small models).
* ``jacobian_moment_estimates``: Hutchinson estimates of m₁ = tr(JJᵀ)/N = E‖Jᵀy‖²/N and
  m₂ = tr((JJᵀ)²)/N = E‖JJᵀy‖²/N with Rademacher probes y; J(Jᵀy) is a JVP, obtained by differentiating
  the VJP with respect to y (double backward). Memory is that of a batch of ``num_probes`` items.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StreamMap = Callable[[torch.Tensor], torch.Tensor]


def exact_jacobian(stream_map: StreamMap, streams: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """J = ∂ vec(X_L) / ∂ vec(X_0) (N, N) at one item ``streams`` (no batch axis): N VJPs, ``chunk_size`` at a time.

    A stream map is square (streams in, streams out), so item i of a batch of N copies asks for row i.
    """
    size = streams.numel()
    chunk = chunk_size or size
    rows = []
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        inputs = streams.detach().unsqueeze(0).repeat(count, *([1] * streams.dim())).requires_grad_(True)
        outputs = stream_map(inputs).flatten(1)  # (count, N)
        seeds = torch.zeros_like(outputs)
        seeds[torch.arange(count), start + torch.arange(count)] = 1.0
        (grad,) = torch.autograd.grad(outputs, inputs, seeds)
        rows.append(grad.flatten(1))
    return torch.cat(rows)


def squared_singular_values(jacobian: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of JᵀJ (ascending, float64, clipped at 0)."""
    j = jacobian.double()
    return torch.linalg.eigvalsh(j.T @ j).clamp_min(0.0)


def jacobian_moment_estimates(
    stream_map: StreamMap, streams: torch.Tensor, num_probes: int = 32, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Hutchinson estimates (m₁, m₂) of tr(JJᵀ)/N and tr((JJᵀ)²)/N at one item ``streams`` (no batch axis)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    inputs = streams.detach().unsqueeze(0).repeat(num_probes, *([1] * streams.dim())).requires_grad_(True)
    outputs = stream_map(inputs)
    probes = (torch.randint(0, 2, outputs.shape, generator=generator) * 2 - 1).to(outputs.dtype).requires_grad_(True)
    (vjp,) = torch.autograd.grad(outputs, inputs, probes, create_graph=True)  # Jᵀy
    (jjt_y,) = torch.autograd.grad(vjp, probes, vjp.detach())  # J(Jᵀy) = JJᵀy
    size = streams.numel()
    m1 = vjp.detach().flatten(1).square().sum(1).mean().item() / size
    m2 = jjt_y.flatten(1).square().sum(1).mean().item() / outputs[0].numel()
    return m1, m2


def model_stream_map(model: torch.nn.Module, input_ids: torch.Tensor) -> StreamMap:
    """The stream map X_L ← X_0 of a JPmHC LM's decoder stack on one sequence ``input_ids`` (T,).

    Returns f: streams (B, T, n, C) → streams (B, T, n, C): the model runs on B copies of the sequence, a
    pre-hook on the first decoder layer swaps in the given X_0, a hook on the last one captures X_L.
    """
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (T,), got shape {tuple(input_ids.shape)}")

    def stream_map(streams: torch.Tensor) -> torch.Tensor:
        captured = {}
        swap = layers[0].register_forward_pre_hook(lambda module, args: (streams.to(args[0].dtype),) + args[1:])
        grab = layers[-1].register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
        try:
            base(input_ids=input_ids.expand(streams.shape[0], -1), use_cache=False)
        finally:
            swap.remove(), grab.remove()
        return captured["out"]

    return stream_map
