"""Reference: the dynamic coefficients of a read (SPEC §1), plain float32 torch.

    x̃ = RMSNorm(flatten X)    z = α_seg · x̃ Φᵀ + b    pre = σ(z_pre) + eps    post = 2σ(z_post)    θ = z_res
"""

import torch


def hc_coefficients_reference(streams, phi, alpha, bias, split_sizes, pre_eps: float = 0.0, norm_eps: float = 1e-6):
    """pre (…, n_pre), post (…, n_post), θ (…, r) from streams (…, n, C), Φ (M, nC), α (3,), b (M,)."""
    x = streams.flatten(-2).float()  # (…, nC)
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)  # unweighted RMSNorm
    scale = torch.cat([a.expand(size) for a, size in zip(alpha.float(), split_sizes)])  # α over its segment
    z = normed @ phi.float().T * scale + bias.float()  # (…, M)
    z_pre, z_post, z_res = z.split(list(split_sizes), dim=-1)
    return torch.sigmoid(z_pre) + pre_eps, 2 * torch.sigmoid(z_post), z_res
