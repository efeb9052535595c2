// The CPU path's per-token passes of a hyper-connection (kernel_backend="compiled"), float32, as hand-fused
// loops: each reads the streams once per pass and computes every output of that pass, where inductor makes one
// pass per output; and, for inference, a whole read in one call (read_streams). Conventions and the maths are
// those of hf_jpmhc/models/hyper_connection.py and mixers.py (the torch references); tokens are rows, X is
// (T, n, C) contiguous, Φ is (M, nC). Tokens are split over at::parallel_for's threads; inner loops over C are
// vectorised by the compiler (omp simd), the read's backward explicitly (GCC/Clang vector extensions, in registers).
// Each function is a registered torch op (torch.ops.hf_jpmhc.*), shaped like its torch reference's outputs.
//
// The numerical constants (HF_*) are not defined here: hf_jpmhc/ops/cpu/__init__.py passes them as -D flags from
// their one definition in Python (hf_jpmhc/models/sinkhorn.py, stream_passes.py; the mixer kinds in ops/cpu), so
// changing one there rebuilds this file with it. The mixers' index tables (the skew logits' (i, j), Kronecker's
// factor bits) arrive as arguments, from the mixers' own buffers.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kGrain = 16;  // tokens per parallel task: one token is n·C floats, several KB
constexpr int64_t kBlock = 8;   // tokens sharing each load of Φ in the read's backward (their vectors in registers)

// One SIMD register of floats (GCC/Clang vector extension; the compiler splits it where the machine is narrower).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
inline Vec load(const float* p) {  // unaligned
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }
inline float lane_sum(const Vec& v) {
  float a = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) a += v[i];
  return a;
}

void check(const torch::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements (one entry per token), got ", t.numel());
}

}  // namespace

// X's leading (token) sizes followed by ``tail``.
std::vector<int64_t> lead_then(const torch::Tensor& X, std::vector<int64_t> tail) {
  const auto lead = X.sizes().slice(0, X.dim() - 2);
  tail.insert(tail.begin(), lead.begin(), lead.end());
  return tail;
}

// u = Σ_s w_s X_s per token: (…, n, C), (…, n) → (…, C).
torch::Tensor collapse(const torch::Tensor& X, const torch::Tensor& weights) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(X, "X", T * n * C), check(weights, "weights", T * n);
  auto out = torch::empty(lead_then(X, {C}), X.options());
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

// ⟨v, X_s⟩ per token and stream: (…, C), (…, n, C) → (…, n) (the collapse's ∂pre, ∂u · X).
torch::Tensor row_dot(const torch::Tensor& v, const torch::Tensor& X) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C);
  check(v, "v", T * C), check(X, "X", T * n * C);
  auto out = torch::empty(lead_then(X, {n}), X.options());
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

// Φ by column panels, (K / kLanes, rows, kLanes), rows ≥ M padded with zeros: the rows of one vector of columns
// are contiguous, so a loop over them streams through memory instead of striding K floats at each row. The last
// K mod kLanes columns are left out.
torch::Tensor panels_of(const torch::Tensor& phi, int64_t rows) {
  const int64_t M = phi.size(0), panels = phi.size(1) / kLanes;
  auto packed = torch::zeros({panels, rows, kLanes}, phi.options());
  packed.narrow(1, 0, M).copy_(phi.narrow(1, 0, panels * kLanes).view({M, panels, kLanes}).transpose(0, 1));
  return packed;
}

// The read's projection and RMS scale in one pass over X (projection_and_rstd), x = flatten(X):
//   rstd = (mean x² + eps)^(-1/2)        zlin = (x Φᵀ) · rstd
// A register tile of kTileTokens tokens × kTileRows rows of Φ accumulates one vector of partial dot products each
// over all column panels (the tokens' x stays in cache across the row tiles); lanes are summed at the end.
std::tuple<torch::Tensor, torch::Tensor> projection(const torch::Tensor& X, const torch::Tensor& phi, double eps) {
  constexpr int64_t kTileTokens = 4, kTileRows = 4;
  const int64_t K = X.size(-2) * X.size(-1), T = X.numel() / K, M = phi.size(0);
  check(X, "X", T * K), check(phi, "phi", M * K);
  auto zlin = torch::empty(lead_then(X, {M}), X.options()), rstd = torch::empty(lead_then(X, {1}), X.options());
  if (T < HF_FEW_TOKENS) {  // decoding: Φ row by row as it lies (1 thread, in cache: packing Φ ≈ 20 µs, a token 3.4)
    const float *x = X.data_ptr<float>(), *w = phi.data_ptr<float>();
    float *z = zlin.data_ptr<float>(), *rs = rstd.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * K;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < K; ++k) ss += xt[k] * xt[k];
      rs[t] = 1.f / std::sqrt(ss / K + static_cast<float>(eps));
      for (int64_t m = 0; m < M; ++m) {
        const float* wm = w + m * K;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t k = 0; k < K; ++k) d += xt[k] * wm[k];
        z[t * M + m] = d * rs[t];
      }
    }
    return {zlin, rstd};
  }
  const int64_t padded = (M + kTileRows - 1) / kTileRows * kTileRows;  // rows of zeros complete the last tile
  const auto packed = panels_of(phi, padded);
  const int64_t panels = packed.size(0), vectorised = panels * kLanes;
  const float *x = X.data_ptr<float>(), *w = phi.data_ptr<float>(), *wp = packed.data_ptr<float>();
  float *z = zlin.data_ptr<float>(), *rs = rstd.data_ptr<float>();
  at::parallel_for(0, (T + kTileTokens - 1) / kTileTokens, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = b0 * kTileTokens; t0 < std::min(T, b1 * kTileTokens); t0 += kTileTokens) {
      const int64_t nb = std::min(kTileTokens, T - t0);
      const float* xb[kTileTokens];
      for (int64_t b = 0; b < kTileTokens; ++b) xb[b] = x + (t0 + std::min(b, nb - 1)) * K;  // repeat the last
      for (int64_t b = 0; b < nb; ++b) {
        Vec sq = {};
        for (int64_t p = 0; p < panels; ++p) {
          const Vec v = load(xb[b] + p * kLanes);
          sq += v * v;
        }
        float ss = lane_sum(sq);
        for (int64_t k = vectorised; k < K; ++k) ss += xb[b][k] * xb[b][k];
        rs[t0 + b] = 1.f / std::sqrt(ss / K + static_cast<float>(eps));
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        Vec acc[kTileTokens][kTileRows] = {};
        for (int64_t p = 0; p < panels; ++p) {
          Vec xr[kTileTokens], wv[kTileRows];
          for (int64_t b = 0; b < kTileTokens; ++b) xr[b] = load(xb[b] + p * kLanes);
          for (int64_t r = 0; r < kTileRows; ++r) wv[r] = load(wp + (p * padded + m0 + r) * kLanes);
          for (int64_t b = 0; b < kTileTokens; ++b)
            for (int64_t r = 0; r < kTileRows; ++r) acc[b][r] += xr[b] * wv[r];
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t m = m0; m < std::min(M, m0 + kTileRows); ++m) {
            float d = lane_sum(acc[b][m - m0]);
            for (int64_t k = vectorised; k < K; ++k) d += xb[b][k] * w[m * K + k];
            z[(t0 + b) * M + m] = d * rs[t0 + b];
          }
      }
    }
  });
  return {zlin, rstd};
}

// ---- a whole read without autograd (read_streams): coefficients, mixer and collapse in one call ----------------
// The mixers' maths for one token, as hf_jpmhc/models/mixers.py computes it (its torch code is the reference);
// the n×n matrices are row-major H[s, t], small enough that plain loops are the fast way.

namespace {

enum MixerKind : int64_t {  // the codes of hf_jpmhc/ops/cpu/__init__.py's MIXER_KINDS
  kLogits = HF_MIXER_LOGITS, kSinkhorn = HF_MIXER_SINKHORN, kCayley = HF_MIXER_CAYLEY, kKronecker = HF_MIXER_KRONECKER
};

// a⁻¹ b in place (b gets the result), a (m, m) and b (m, k) row-major: Gauss–Jordan without pivoting, as
// mixers.solve_small under torch.compile (the systems' symmetric parts are positive definite).
void solve_small(double* a, double* b, int64_t m, int64_t k) {
  for (int64_t p = 0; p < m; ++p) {
    const double inv = 1.0 / a[p * m + p];
    for (int64_t j = 0; j < m; ++j) a[p * m + j] *= inv;
    for (int64_t j = 0; j < k; ++j) b[p * k + j] *= inv;
    for (int64_t i = 0; i < m; ++i) {
      if (i == p) continue;
      const double f = a[i * m + p];
      for (int64_t j = 0; j < m; ++j) a[i * m + j] -= f * a[p * m + j];
      for (int64_t j = 0; j < k; ++j) b[i * k + j] -= f * b[p * k + j];
    }
  }
}

double row_error(const double* p, int64_t n) {  // max_s |Σ_t P[s, t] − 1|
  double err = 0.0;
  for (int64_t s = 0; s < n; ++s) {
    double a = 0.0;
    for (int64_t t = 0; t < n; ++t) a += p[s * n + t];
    err = std::max(err, std::abs(a - 1.0));
  }
  return err;
}

void normalise_rows(double* p, int64_t n) {
  for (int64_t s = 0; s < n; ++s) {
    double a = 0.0;
    for (int64_t t = 0; t < n; ++t) a += p[s * n + t];
    for (int64_t t = 0; t < n; ++t) p[s * n + t] /= a;
  }
}

void normalise_columns(double* p, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    double a = 0.0;
    for (int64_t s = 0; s < n; ++s) a += p[s * n + t];
    for (int64_t s = 0; s < n; ++s) p[s * n + t] /= a;
  }
}

// sinkhorn.sinkhorn_iterate with eps = 0 (CPU, no autograd): a log-domain first round in float32, division rounds
// in float64 that stop at NEWTON_BASIN (with ≥ NEWTON_FROM_BASIN polish steps to follow) or at EARLY_EXIT_ULPS ulp
// of float32, tested before the first and every ROUND_CHECK_EVERY, then the Newton polish (sinkhorn_newton) to
// EARLY_EXIT_ULPS ulp of float64. scratch: 2n² + 2n doubles.
void sinkhorn(const float* theta, float* h, int64_t n, int64_t iters, int64_t newton_steps, double* scratch) {
  constexpr double kRidge = HF_SCALING_RIDGE;
  double *p = scratch, *schur = p + n * n, *f = schur + n * n, *rows = f + n;
  float* log_p = reinterpret_cast<float*>(schur);  // the first round's float32 logs, before the polish needs it
  for (int64_t s = 0; s < n; ++s) {  // rows: log_softmax over t
    const float* row = theta + s * n;
    const float top = *std::max_element(row, row + n);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += std::exp(row[t] - top);
    const float lse = top + std::log(sum);
    for (int64_t t = 0; t < n; ++t) log_p[s * n + t] = row[t] - lse;
  }
  for (int64_t t = 0; t < n; ++t) {  // columns: log_softmax over s, then P = exp in float64
    float top = log_p[t];
    for (int64_t s = 1; s < n; ++s) top = std::max(top, log_p[s * n + t]);
    float sum = 0.f;
    for (int64_t s = 0; s < n; ++s) sum += std::exp(log_p[s * n + t] - top);
    const float lse = top + std::log(sum);
    for (int64_t s = 0; s < n; ++s) p[s * n + t] = std::exp(static_cast<double>(log_p[s * n + t] - lse));
  }
  const double tol = newton_steps >= HF_NEWTON_FROM_BASIN ? HF_NEWTON_BASIN
                                                         : HF_EARLY_EXIT_ULPS * std::numeric_limits<float>::epsilon();
  for (int64_t i = 0; i < iters - 1; ++i) {
    if (i % HF_ROUND_CHECK_EVERY == 0 && row_error(p, n) <= tol) break;
    normalise_rows(p, n), normalise_columns(p, n);
  }
  if (newton_steps > 0) normalise_columns(p, n);
  for (int64_t step = 0; step < newton_steps; ++step) {  // solve S f = 1 − row for the row scalings (_scaling_solve)
    double err = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      rows[i] = 0.0;
      for (int64_t t = 0; t < n; ++t) rows[i] += p[i * n + t];
      f[i] = 1.0 - rows[i];
      err = std::max(err, std::abs(f[i]));
    }
    if (err <= HF_EARLY_EXIT_ULPS * std::numeric_limits<double>::epsilon()) break;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double pp = 0.0;
        for (int64_t t = 0; t < n; ++t) pp += p[i * n + t] * p[j * n + t];
        schur[i * n + j] = (i == j ? rows[i] + kRidge : 0.0) - pp / (1 + kRidge) + 1.0;
      }
    solve_small(schur, f, n, 1);
    for (int64_t s = 0; s < n; ++s) {
      const double scale = std::exp(std::clamp(f[s], -HF_NEWTON_STEP_CLAMP, HF_NEWTON_STEP_CLAMP));
      for (int64_t t = 0; t < n; ++t) p[s * n + t] *= scale;
    }
    normalise_columns(p, n);
  }
  for (int64_t k = 0; k < n * n; ++k) h[k] = static_cast<float>(p[k]);
}

// cayley.cayley on A = Σ_k θ_k (E_ij − E_ji), (i, j) = pairs[k] (cayley.skew_pairs): (I − A/2)⁻¹(I + A/2) in
// float64. scratch: 2n² doubles.
void cayley(const float* theta, const int64_t* pairs, float* h, int64_t n, double* scratch) {
  double *lhs = scratch, *rhs = scratch + n * n;
  std::fill(scratch, scratch + 2 * n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) lhs[i * n + i] = rhs[i * n + i] = 1.0;
  for (int64_t k = 0; k < n * (n - 1) / 2; ++k) {
    const int64_t i = pairs[2 * k], j = pairs[2 * k + 1];
    const double half = static_cast<double>(theta[k]) / 2;
    lhs[i * n + j] = -half, lhs[j * n + i] = half, rhs[i * n + j] = half, rhs[j * n + i] = -half;
  }
  solve_small(lhs, rhs, n, n);
  for (int64_t k = 0; k < n * n; ++k) h[k] = static_cast<float>(rhs[k]);
}

// KroneckerMixer: H[s, t] = Π_k (p_k if same[s, t, k] else 1 − p_k), p = σ(θ), same = the mixer's same_bit (n, n, K).
void kronecker(const float* theta, const bool* same, float* h, int64_t n, int64_t factors) {
  float p[64];  // n = 2^factors fits in int64_t
  for (int64_t k = 0; k < factors; ++k) p[k] = 1.f / (1.f + std::exp(-theta[k]));
  for (int64_t st = 0; st < n * n; ++st) {
    float a = 1.f;
    for (int64_t k = 0; k < factors; ++k) a *= same[st * factors + k] ? p[k] : 1.f - p[k];
    h[st] = a;
  }
}

}  // namespace

// read_streams: z = α_seg · RMSNorm(flatten X) Φᵀ + b, each row m of z in segment[m] (0 pre, 1 post, 2 res, its α
// alpha[segment[m]]); pre = σ(z_pre) + pre_eps, post = 2σ(z_post), θ = z_res; u = Σ_s pre_s X_s; and the mixer's
// H(θ) (kind ≠ logits, with its index table) or θ itself. X (…, n, C) → u (…, C), post (…, n_post), H (…, n, n) or
// θ (…, r): shaped here, since at one token a view from Python costs as much as this whole call.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> read_streams(
    const torch::Tensor& X, const torch::Tensor& phi, const torch::Tensor& alpha, const torch::Tensor& bias,
    const torch::Tensor& segment, int64_t n_post, double pre_eps, double norm_eps, int64_t kind, int64_t iters,
    int64_t newton_steps, const torch::Tensor& table) {
  const int64_t n = X.size(-2), C = X.size(-1), T = X.numel() / (n * C), M = phi.size(0), r = M - n - n_post;
  check(alpha, "alpha", 3), check(bias, "bias", M);
  TORCH_CHECK(segment.scalar_type() == torch::kInt64 && segment.is_contiguous() && segment.numel() == M,
              "segment must be a contiguous int64 tensor with one entry per row of phi");
  const bool fits = kind == kLogits     ? r >= 0
                    : kind == kSinkhorn ? r == n * n
                    : kind == kCayley   ? r == n * (n - 1) / 2 && table.numel() == 2 * r &&
                                            table.scalar_type() == torch::kInt64 && table.is_contiguous()
                                        : kind == kKronecker && table.numel() == n * n * r &&
                                            table.scalar_type() == torch::kBool && table.is_contiguous();
  TORCH_CHECK(fits, "read_streams: ", r, " mixer logits do not fit mixer kind ", kind, " with ", n, " streams");
  auto zlin = std::get<0>(projection(X, phi, norm_eps));  // (…, M), checks X and Φ
  auto pre = torch::empty(lead_then(X, {n}), X.options()), post = torch::empty(lead_then(X, {n_post}), X.options());
  auto mix = torch::empty(kind == kLogits ? lead_then(X, {r}) : lead_then(X, {n, n}), X.options());
  const float *zl = zlin.data_ptr<float>(), *a = alpha.data_ptr<float>(), *b = bias.data_ptr<float>();
  const int64_t* seg = segment.data_ptr<int64_t>();
  float *pr = pre.data_ptr<float>(), *po = post.data_ptr<float>(), *hm = mix.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> theta(std::max<int64_t>(r, 1));
    std::vector<double> scratch(2 * n * n + 2 * n);  // every entry a mixer reads it has written first
    for (int64_t t = begin; t < end; ++t) {
      float *pt = pr + t * n, *qt = po + t * n_post, *th = theta.data();
      for (int64_t m = 0; m < M; ++m) {
        const float z = b[m] + zl[t * M + m] * a[seg[m]];
        if (seg[m] == 0) *pt++ = 1.f / (1.f + std::exp(-z)) + static_cast<float>(pre_eps);
        else if (seg[m] == 1) *qt++ = 2.f / (1.f + std::exp(-z));
        else *th++ = z;
      }
      float* h = hm + t * (kind == kLogits ? r : n * n);
      if (kind == kLogits) std::copy(theta.begin(), theta.begin() + r, h);
      else if (kind == kSinkhorn) sinkhorn(theta.data(), h, n, iters, newton_steps, scratch.data());
      else if (kind == kCayley) cayley(theta.data(), table.data_ptr<int64_t>(), h, n, scratch.data());
      else kronecker(theta.data(), table.data_ptr<bool>(), h, n, r);
    }
  });
  return {collapse(X, pre), post, mix};
}

// The read's ∂X and ∂Φ in one pass (HyperConnectionRead.backward), x = flatten(X):
//   ∂X = pre ⊗ ∂u − κ X + g Φ        ∂Φ = gᵀ x
// Register-blocked over kBlock tokens and one vector of columns: the block's x and ∂X vectors stay in registers
// over all M rows, each of which loads one vector of Φ and updates one of ∂Φ, two FMAs per token and load.
// Each thread sums its tokens' ∂Φ in its own buffer; the buffers are added at the end.
std::tuple<torch::Tensor, torch::Tensor> read_backward(const torch::Tensor& X, const torch::Tensor& pre,
                                                      const torch::Tensor& grad_u, const torch::Tensor& kappa,
                                                      const torch::Tensor& g, const torch::Tensor& phi) {
  const int64_t n = X.size(-2), C = X.size(-1), K = n * C, T = X.numel() / K, M = phi.size(0);
  check(X, "X", T * K), check(pre, "pre", T * n), check(grad_u, "grad_u", T * C), check(kappa, "kappa", T);
  check(g, "g", T * M), check(phi, "phi", M * K);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (T + kGrain - 1) / kGrain));
  auto grad_x = torch::empty_like(X), partial = torch::zeros({chunks, M, K}, X.options());
  const float *x = X.data_ptr<float>(), *pr = pre.data_ptr<float>(), *du = grad_u.data_ptr<float>(),
              *ka = kappa.data_ptr<float>(), *gp = g.data_ptr<float>(), *w = phi.data_ptr<float>();
  float *dx = grad_x.data_ptr<float>(), *dw_all = partial.data_ptr<float>();
  // Φ and each thread's ∂Φ by column panels (panels_of)
  const auto packed = panels_of(phi, M);
  const int64_t panels = packed.size(0), vectorised = panels * kLanes;
  auto partial_packed = torch::zeros({chunks, panels, M, kLanes}, X.options());
  const float* wp = packed.data_ptr<float>();
  float* dwp_all = partial_packed.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> gb(M * kBlock);  // the block's g, row-major by m; zero for tokens past the end
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float *dw = dw_all + chunk * M * K, *dwp = dwp_all + chunk * panels * M * kLanes;
      const int64_t begin = T * chunk / chunks, end = T * (chunk + 1) / chunks;
      for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, end - t0);
        int64_t tok[kBlock];
        for (int64_t b = 0; b < kBlock; ++b) {
          tok[b] = t0 + std::min(b, nb - 1);  // a missing token repeats the last one, with g = 0, and is not stored
          for (int64_t m = 0; m < M; ++m) gb[m * kBlock + b] = b < nb ? gp[tok[b] * M + m] : 0.f;
        }
        auto pointwise = [&](int64_t t, int64_t k) {  // pre ⊗ ∂u − κ x at column k of token t
          return pr[t * n + k / C] * du[t * C + k % C] - ka[t] * x[t * K + k];
        };
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t k0 = p * kLanes, s = k0 / C, c = k0 % C;
          Vec xr[kBlock], d[kBlock];
          for (int64_t b = 0; b < kBlock; ++b) {
            const int64_t t = tok[b];
            xr[b] = load(x + t * K + k0);
            __builtin_prefetch(x + (t + kBlock) * K + k0);  // the next block's
            if (c + kLanes <= C) {
              d[b] = pr[t * n + s] * load(du + t * C + c) - ka[t] * xr[b];
            } else {  // the vector straddles two streams
              float lanes[kLanes];
              for (int64_t j = 0; j < kLanes; ++j) lanes[j] = pointwise(t, k0 + j);
              d[b] = load(lanes);
            }
          }
          const float *wm = wp + p * M * kLanes, *gm = gb.data();
          float* dwm = dwp + p * M * kLanes;
          for (int64_t m = 0; m < M; ++m, wm += kLanes, dwm += kLanes, gm += kBlock) {
            const Vec wv = load(wm);
            Vec acc = load(dwm);
            for (int64_t b = 0; b < kBlock; ++b) d[b] += gm[b] * wv, acc += gm[b] * xr[b];
            store(dwm, acc);
          }
          for (int64_t b = 0; b < nb; ++b) store(dx + tok[b] * K + k0, d[b]);
        }
        for (int64_t k = vectorised; k < K; ++k) {  // the last K mod kLanes columns
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t t = tok[b];
            float a = pointwise(t, k);
            for (int64_t m = 0; m < M; ++m) {
              const float gm = gb[m * kBlock + b];
              a += gm * w[m * K + k], dw[m * K + k] += gm * x[t * K + k];
            }
            dx[t * K + k] = a;
          }
        }
      }
    }
  });
  partial.narrow(2, 0, vectorised).copy_(partial_packed.transpose(1, 2).reshape({chunks, M, vectorised}));
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
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> update_backward(
    const torch::Tensor& X, const torch::Tensor& H, const torch::Tensor& post, const torch::Tensor& f,
    const torch::Tensor& grad_out) {
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

// The constants this library was built with, in hf_jpmhc/ops/cpu/__init__.py's NUMERICS order (a test compares).
std::vector<double> numerics() { return {HF_NUMERICS}; }

TORCH_LIBRARY(hf_jpmhc, m) {
  m.def("collapse(Tensor x, Tensor weights) -> Tensor");
  m.def("row_dot(Tensor v, Tensor x) -> Tensor");
  m.def("projection(Tensor x, Tensor phi, float eps) -> (Tensor, Tensor)");
  m.def("read_streams(Tensor x, Tensor phi, Tensor alpha, Tensor bias, Tensor segment, int n_post, float pre_eps, "
        "float norm_eps, int kind, int iters, int newton_steps, Tensor table) -> (Tensor, Tensor, Tensor)");
  m.def("read_backward(Tensor x, Tensor pre, Tensor grad_u, Tensor kappa, Tensor g, Tensor phi) -> (Tensor, Tensor)");
  m.def("update(Tensor x, Tensor h, Tensor post, Tensor f) -> Tensor");
  m.def("update_backward(Tensor x, Tensor h, Tensor post, Tensor f, Tensor grad_out) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("numerics() -> float[]", &numerics);
}

TORCH_LIBRARY_IMPL(hf_jpmhc, CPU, m) {
  m.impl("collapse", &collapse);
  m.impl("row_dot", &row_dot);
  m.impl("projection", &projection);
  m.impl("read_streams", &read_streams);
  m.impl("read_backward", &read_backward);
  m.impl("update", &update);
  m.impl("update_backward", &update_backward);
}
