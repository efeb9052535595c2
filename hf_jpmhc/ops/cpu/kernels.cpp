// The CPU training path's per-token passes of a hyper-connection (kernel_backend="compiled"), float32, as
// hand-fused loops: each reads the streams once per pass and computes every output of that pass, where
// inductor makes one pass per output. Conventions and the maths are those of
// hf_jpmhc/models/hyper_connection.py (the torch references); tokens are rows, X is (T, n, C) contiguous,
// Φ is (M, nC). Tokens are split over at::parallel_for's threads; inner loops over C are vectorised by the
// compiler (omp simd).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kGrain = 16;  // tokens per parallel task: one token is n·C floats, several KB
constexpr int64_t kBlock = 4;   // tokens sharing each load of Φ in the read's backward
constexpr int64_t kTile = 64;   // columns of x per L1-resident tile in read_backward

void check(const torch::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements (one entry per token), got ", t.numel());
}

}  // namespace

// u = Σ_s w_s X_s per token: (T, n, C), (T, n) → (T, C).
torch::Tensor collapse(const torch::Tensor& X, const torch::Tensor& weights) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(X, "X", T * n * C), check(weights, "weights", T * n);
  auto out = torch::empty({T, C}, X.options());
  const float *x = X.data_ptr<float>(), *wt = weights.data_ptr<float>();
  float* u = out.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *xt = x + t * n * C, *w = wt + t * n;
      float* ut = u + t * C;
      const float w0 = w[0];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ut[c] = w0 * xt[c];
      for (int64_t s = 1; s < n; ++s) {
        const float ws = w[s];
        const float* xs = xt + s * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ut[c] += ws * xs[c];
      }
    }
  });
  return out;
}

// ⟨v, X_s⟩ per token and stream: (T, C), (T, n, C) → (T, n) (the collapse's ∂pre, ∂u · X).
torch::Tensor row_dot(const torch::Tensor& v, const torch::Tensor& X) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(v, "v", T * C), check(X, "X", T * n * C);
  auto out = torch::empty({T, n}, X.options());
  const float *vp = v.data_ptr<float>(), *x = X.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* vt = vp + t * C;
      for (int64_t s = 0; s < n; ++s) {
        const float* xs = x + (t * n + s) * C;
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t c = 0; c < C; ++c) a += vt[c] * xs[c];
        o[t * n + s] = a;
      }
    }
  });
  return out;
}

// The read's ∂X and ∂Φ in one pass (HyperConnectionRead.backward), x = flatten(X):
//   ∂X = pre ⊗ ∂u − κ X + g Φ        ∂Φ = gᵀ x
// Each thread sums its tokens' ∂Φ in its own buffer; the buffers are added at the end.
std::vector<torch::Tensor> read_backward(const torch::Tensor& X, const torch::Tensor& pre, const torch::Tensor& grad_u,
                                         const torch::Tensor& kappa, const torch::Tensor& g, const torch::Tensor& phi) {
  const int64_t n = X.size(-2), C = X.size(-1), K = n * C, T = X.numel() / K, M = phi.size(0);
  check(X, "X", T * K), check(pre, "pre", T * n), check(grad_u, "grad_u", T * C), check(kappa, "kappa", T);
  check(g, "g", T * M), check(phi, "phi", M * K);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (T + kGrain - 1) / kGrain));
  auto grad_x = torch::empty_like(X), partial = torch::zeros({chunks, M, K}, X.options());
  const float *x = X.data_ptr<float>(), *pr = pre.data_ptr<float>(), *du = grad_u.data_ptr<float>(),
              *ka = kappa.data_ptr<float>(), *gp = g.data_ptr<float>(), *w = phi.data_ptr<float>();
  float *dx = grad_x.data_ptr<float>(), *dw_all = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* dw = dw_all + chunk * M * K;
      std::vector<float> gb(kBlock * M);  // the block's g, token-major; zero for tokens past the end
      const int64_t begin = T * chunk / chunks, end = T * (chunk + 1) / chunks;
      for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, end - t0);
        std::fill(gb.begin(), gb.end(), 0.f);
        const float* xb[kBlock];
        float* dxb[kBlock];
        for (int64_t b = 0; b < kBlock; ++b) {
          const int64_t t = t0 + std::min(b, nb - 1);  // a missing token repeats the last one, with g = 0
          xb[b] = x + t * K, dxb[b] = dx + t * K;
          if (b < nb) std::copy(gp + t * M, gp + (t + 1) * M, gb.begin() + b * M);
        }
        for (int64_t b = 0; b < nb; ++b) {  // the pointwise part, pre ⊗ ∂u − κ X
          const int64_t t = t0 + b;
          const float *xt = xb[b], *dut = du + t * C;
          const float kt = ka[t];
          for (int64_t s = 0; s < n; ++s) {
            const float ps = pr[t * n + s];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dxb[b][s * C + c] = ps * dut[c] - kt * xt[s * C + c];
          }
        }
        // + g Φ and ∂Φ += gᵀ x, a tile of kTile columns at a time: the block's x and ∂X tiles stay in L1
        // over all M rows of Φ and ∂Φ, each of which is then read (and ∂Φ written) once per block of tokens
        for (int64_t k0 = 0; k0 < K; k0 += kTile) {
          const int64_t width = std::min(kTile, K - k0);
          float d[kBlock][kTile] = {}, xv[kBlock][kTile] = {};
          for (int64_t b = 0; b < kBlock; ++b)
            for (int64_t j = 0; j < width; ++j) xv[b][j] = xb[b][k0 + j];
          for (int64_t m = 0; m < M; ++m) {
            const float* wm = w + m * K + k0;
            float* dwm = dw + m * K + k0;
            const float g0 = gb[m], g1 = gb[M + m], g2 = gb[2 * M + m], g3 = gb[3 * M + m];
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
              const float wk = wm[j];
              d[0][j] += g0 * wk, d[1][j] += g1 * wk, d[2][j] += g2 * wk, d[3][j] += g3 * wk;
              dwm[j] += g0 * xv[0][j] + g1 * xv[1][j] + g2 * xv[2][j] + g3 * xv[3][j];
            }
          }
          for (int64_t b = 0; b < nb; ++b)
            for (int64_t j = 0; j < width; ++j) dxb[b][k0 + j] += d[b][j];
        }
      }
    }
  });
  return {grad_x, chunks == 1 ? partial[0] : partial.sum(0)};
}

// X' = Hᵀ X + post ⊗ f per token, as X + (H − I)ᵀ X + post ⊗ f (the identity part added exactly).
torch::Tensor update(const torch::Tensor& X, const torch::Tensor& H, const torch::Tensor& post, const torch::Tensor& f) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(X, "X", T * n * C), check(H, "H", T * n * n), check(post, "post", T * n), check(f, "f", T * C);
  auto out = torch::empty_like(X);
  const float *x = X.data_ptr<float>(), *h = H.data_ptr<float>(), *p = post.data_ptr<float>(), *fp = f.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *xt = x + t * n * C, *ht = h + t * n * n, *ft = fp + t * C;
      for (int64_t j = 0; j < n; ++j) {
        float* oj = o + (t * n + j) * C;
        const float pj = p[t * n + j];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) oj[c] = pj * ft[c];
        for (int64_t s = 0; s < n; ++s) {
          const float hs = ht[s * n + j] - (s == j ? 1.f : 0.f);
          const float* xs = xt + s * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) oj[c] += hs * xs[c];
        }
        const float* xj = xt + j * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) oj[c] += xj[c];
      }
    }
  });
  return out;
}

// The update's backward in one pass per token (stream_update_grads), with dY = ∂X':
//   ∂X_s = Σ_j H[s, j] dY_j     ∂H[s, j] = ⟨X_s, dY_j⟩     ∂post_j = ⟨f, dY_j⟩     ∂f = Σ_j post_j dY_j
std::vector<torch::Tensor> update_backward(const torch::Tensor& X, const torch::Tensor& H, const torch::Tensor& post,
                                           const torch::Tensor& f, const torch::Tensor& grad_out) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(X, "X", T * n * C), check(H, "H", T * n * n), check(post, "post", T * n), check(f, "f", T * C);
  check(grad_out, "grad_out", T * n * C);
  auto dX = torch::empty_like(X), dH = torch::empty_like(H), dP = torch::empty_like(post), dF = torch::empty_like(f);
  const float *x = X.data_ptr<float>(), *h = H.data_ptr<float>(), *p = post.data_ptr<float>(), *fp = f.data_ptr<float>(),
              *dy = grad_out.data_ptr<float>();
  float *dx = dX.data_ptr<float>(), *dh = dH.data_ptr<float>(), *dp = dP.data_ptr<float>(), *df = dF.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *xt = x + t * n * C, *dyt = dy + t * n * C, *ht = h + t * n * n, *ft = fp + t * C;
      float *dxt = dx + t * n * C, *dft = df + t * C;
      std::fill(dft, dft + C, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* dyj = dyt + j * C;
        const float pj = p[t * n + j];
        float sp = 0.f;
#pragma omp simd reduction(+ : sp)
        for (int64_t c = 0; c < C; ++c) sp += ft[c] * dyj[c], dft[c] += pj * dyj[c];
        dp[t * n + j] = sp;
        for (int64_t s = 0; s < n; ++s) {
          const float* xs = xt + s * C;
          float a = 0.f;
#pragma omp simd reduction(+ : a)
          for (int64_t c = 0; c < C; ++c) a += xs[c] * dyj[c];
          dh[(t * n + s) * n + j] = a;
        }
      }
      for (int64_t s = 0; s < n; ++s) {
        float* dxs = dxt + s * C;
        const float h0 = ht[s * n];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dxs[c] = h0 * dyt[c];
        for (int64_t j = 1; j < n; ++j) {
          const float hj = ht[s * n + j];
          const float* dyj = dyt + j * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dxs[c] += hj * dyj[c];
        }
      }
    }
  });
  return {dX, dH, dP, dF};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("collapse", &collapse);
  m.def("row_dot", &row_dot);
  m.def("read_backward", &read_backward);
  m.def("update", &update);
  m.def("update_backward", &update_backward);
}
