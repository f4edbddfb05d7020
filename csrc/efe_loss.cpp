// Fused expected-free-energy loss on the CPU: loss, stats and gradient in one pass over the
// rows. The math is docs/loss.md (and qwenrl/loss/reference.py); the calling convention, shared
// with the Triton kernels, is documented in qwenrl/loss/dispatch.py.
//
// Two layouts of the same math:
//  * narrow rows (C <= kTileMaxC, e.g. ARC's C = 12): kTileRows rows at a time, transposed into
//    a [C][kTileRows] tile so that every step (max, exp, sums, log, gradient) is one SIMD lane
//    per row. A row of 12 floats is too short for SIMD along the row, and a libm log per row
//    would cost more than the rest of the row.
//  * wide rows (LLM vocabularies): one row at a time, SIMD along the row:
//      pass 1  max, argmax and the non-finite check                 (reads z)
//      pass 2  e = exp(z - m) into a per-thread row buffer, S = Σe,  (reads z)
//              U = Σ e·(z - m)  ->  lse = m + log S,  H(q) = log S - U/S
//      pass 3  gradient  w·s·[(q·Σp - p) - β·q⊙(log q + H)]          (writes grad)
//    The row buffer (C floats) stays in L2; no [N, C] temporary is allocated besides `grad`.
//
// A -inf logit is a masked class: q = 0 and 0·log 0 = 0, so the loss and the gradient stay
// finite (as in F.cross_entropy) unless that class is the target. NaN or +inf logits, a row of
// only -inf, or an out-of-range target that was not validated give a NaN row.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "huge_pages.h"

namespace {

constexpr int kTileRows = 16;       // one AVX-512 register of fp32 per row-vector
constexpr int64_t kTileMaxC = 32;   // widest row the tile layout handles
constexpr float kExpFloor = -87.3f; // exp(-87.3) ~ 1e-38: below it q is 0 for every purpose
constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Reduction { kNone, kMean, kSum };

Reduction parse_reduction(const std::string& name) {
  if (name == "none") return Reduction::kNone;
  if (name == "mean") return Reduction::kMean;
  TORCH_CHECK_VALUE(name == "sum", "efe_forward: reduction must be none, mean or sum, got ", name);
  return Reduction::kSum;
}

// exp(x) for x in [-87.3, 88.7] in a form the compiler vectorises (no libm call): 2^n · P(r)
// with the Cephes single-precision polynomial. Callers clamp x.
__attribute__((always_inline)) inline float fast_exp(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(x) for a normal positive x, vectorisable (Cephes logf: x = 2^k·m, m in [√½, √2)).
__attribute__((always_inline)) inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float k = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.70710678f;
  k = small ? k - 1.0f : k;
  m = (small ? m + m : m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * k - 0.5f * z;
  return m + y + 0.693359375f * k;
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// The options of the call, with the per-call constants hoisted out of the row loops.
struct Options {
  bool soft, log_target;
  float tau, easy_weight, beta, eps;
  int64_t ignore_index;
  Reduction reduction;
  float z_loss;  // λ of λ·lse²
  // class targets: p = hi on the target class, lo elsewhere; Σ p log p of that row.
  float hi, lo, plogp_class;

  void hoist(int64_t C) {
    const double c = static_cast<double>(C), e = eps;
    const double h = 1.0 - e + e / c, l = e / c;
    hi = static_cast<float>(h);
    lo = static_cast<float>(l);
    double plogp = h > 0 ? h * std::log(h) : 0.0;
    if (l > 0) plogp += (c - 1.0) * l * std::log(l);
    plogp_class = static_cast<float>(plogp);
  }
};

// Soft target value as stored -> p after log_target and smoothing, and p·log p (0·log 0 = 0).
// p of one soft-target value as stored (after log_target and smoothing), and p·log p.
// Branch-free (both forms are computed, one is selected) so that loops calling them vectorise.
inline float soft_p(float t, bool log_target, float eps, float inv_c) {
  const float ex = fast_exp(std::min(std::max(t, kExpFloor), 88.7f));
  const float prob = log_target ? (t > kExpFloor ? ex : 0.0f) : t;
  return prob * (1.0f - eps) + eps * inv_c;
}
inline float soft_plogp(float p) {
  // Below the smallest normal float p·log p is < 1e-36: 0 (fast_log needs a normal input).
  constexpr float kMinNormal = std::numeric_limits<float>::min();
  return p >= kMinNormal ? p * fast_log(std::max(p, kMinNormal)) : 0.0f;
}

// Per-thread partial sums, merged under a mutex once per chunk.
struct Sums {
  double loss = 0, n_hard = 0, n_correct = 0, risk = 0, entropy = 0;
  void add(const Sums& o) {
    loss += o.loss, n_hard += o.n_hard, n_correct += o.n_correct, risk += o.risk,
        entropy += o.entropy;
  }
};

template <typename scalar_t, typename grad_t, typename target_t>
struct Problem {
  const scalar_t* z;          // [N, C] logits
  const int64_t* y;           // [N] class targets (class mode)
  const target_t* p;          // [N, C] soft targets (soft mode)
  const bool* mask;           // [N] hard mask, or null
  grad_t* grad;               // [N, C] gradient out, or null
  float* loss_rows;           // [N] per-row loss ('none'), or null
  int64_t N, C;
  float row_scale;            // 1/N_valid for 'mean', else 1
  const float* row_weight;    // [N] each row's factor r_i, or null (1)
  float* per_token;           // [4, N] logprob, entropy, correct, lse (kPerTokenFields), or null

  float weight_of(int64_t i) const { return row_weight ? row_weight[i] : 1.0f; }
  // One row's per-token outputs (0 on an ignored row, NaN floats on a NaN row).
  void put_token(int64_t i, float logprob, float entropy, float correct, float lse) const {
    if (!per_token) return;
    per_token[i] = logprob, per_token[N + i] = entropy, per_token[2 * N + i] = correct;
    per_token[3 * N + i] = lse;
  }
};

// --- 16 x 16 transposes between a tile's rows and its [C][kTileRows] layout -----------------

#ifdef __AVX512F__
constexpr bool kHasTranspose16 = true;

// In place: v[i] holds row i of a 16 x 16 block on entry, column i on exit (unpack within
// 128-bit lanes, then exchange the lanes).
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 ab_lo = _mm512_shuffle_f32x4(v[k], v[4 + k], 0x44);
    const __m512 ab_hi = _mm512_shuffle_f32x4(v[k], v[4 + k], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(v[8 + k], v[12 + k], 0x44);
    const __m512 cd_hi = _mm512_shuffle_f32x4(v[8 + k], v[12 + k], 0xEE);
    t[k] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// rows [rows][C] (row-major, C <= kTileMaxC) -> x[c][r]; rows past `rows` read as 0.
inline void transpose_in(const float* src, int32_t C, int rows, float (*x)[kTileRows]) {
  for (int32_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 cols = static_cast<__mmask16>((1u << std::min(16, C - c0)) - 1u);
    __m512 v[16];
    for (int r = 0; r < 16; ++r)
      v[r] = r < rows ? _mm512_maskz_loadu_ps(cols, src + r * C + c0) : _mm512_setzero_ps();
    transpose16(v);
    for (int32_t c = c0; c < std::min(C, c0 + 16); ++c) _mm512_store_ps(x[c], v[c - c0]);
  }
}

// x[c][r] -> rows [rows][C] (row-major); nothing is written past `rows`.
inline void transpose_out(float (*x)[kTileRows], int32_t C, int rows, float* dst) {
  for (int32_t c0 = 0; c0 < C; c0 += 16) {
    const int32_t width = std::min(16, C - c0);
    const __mmask16 cols = static_cast<__mmask16>((1u << width) - 1u);
    __m512 v[16];
    for (int c = 0; c < 16; ++c) v[c] = c < width ? _mm512_load_ps(x[c0 + c]) : _mm512_setzero_ps();
    transpose16(v);
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(dst + r * C + c0, cols, v[r]);
  }
}
#else
constexpr bool kHasTranspose16 = false;
inline void transpose_in(const float*, int32_t, int, float (*)[kTileRows]) {}
inline void transpose_out(float (*)[kTileRows], int32_t, int, float*) {}
#endif

// --- narrow rows: kTileRows rows per step, one SIMD lane per row ---------------------------
//
// tile_rows is a sequence of steps over one tile's stack arrays. The steps are force-inlined,
// so that the compiled tile_rows is one function, as if written in one piece: no calls, and
// the compiler sees that the arrays do not overlap.
#define TILE_STEP __attribute__((always_inline)) inline

// One value per row of a tile (a SIMD lane each), handed from step to step of tile_rows.
struct TileLanes {
  static constexpr int R = kTileRows;
  alignas(64) float m[R], S[R], U[R], x_y[R], e_y[R], sum_x[R], plogp[R], sum_p[R], p_x[R];
  alignas(64) float log_s[R], inv_s[R], H[R], risk[R], coef[R], zcoef[R], valid_f[R];
  alignas(64) int32_t arg[R], yy[R];
  bool valid[R], bad[R];
};

// Per row: valid (in the tile and not ignore_index), bad (NaN row) and the class target yy.
template <typename scalar_t, typename grad_t, typename target_t>
TILE_STEP void tile_targets(const Problem<scalar_t, grad_t, target_t>& pb, const Options& o,
                            int64_t i0, int rows, TileLanes& L) {
  const int64_t C = pb.C;
  for (int r = 0; r < kTileRows; ++r) {
    const int64_t i = i0 + r;
    const bool in = r < rows;
    int64_t y = 0;
    L.valid[r] = in;
    if (!o.soft && in) {
      y = pb.y[i];
      L.valid[r] = y != o.ignore_index;
      L.bad[r] = L.valid[r] && (y < 0 || y >= C);  // unvalidated out-of-range target: NaN row
      if (!L.valid[r] || L.bad[r]) y = 0;
    } else {
      L.bad[r] = false;
    }
    L.yy[r] = static_cast<int32_t>(y);
  }
}

// rows [rows][C] (row-major, any dtype) -> x[c][r] in fp32, one value at a time; rows past
// `rows` read as 0.
template <typename T>
TILE_STEP void convert_tile(const T* src, int32_t C, int rows, float (*x)[kTileRows]) {
  for (int32_t c = 0; c < C; ++c)
    for (int32_t r = 0; r < kTileRows; ++r) x[c][r] = r < rows ? to_float(src[r * C + c]) : 0.0f;
}

// As convert_tile, with the 16 x 16 AVX-512 transposes where the rows are fp32 already.
template <typename T>
TILE_STEP void load_tile(const T* src, int32_t C, int rows, float (*x)[kTileRows]) {
  if constexpr (kHasTranspose16 && std::is_same_v<T, float>) {
    transpose_in(src, C, rows, x);
  } else {
    convert_tile(src, C, rows, x);
  }
}

// Max and the NaN / +inf check, then the argmax (first maximum) in a pass of its own: float
// selects only, so that each loop is one SIMD lane per row. Then per row: the NaN-row flag,
// m = 0 on a NaN row, and x_y = z_y - m (read here, before x is clamped).
TILE_STEP void tile_max_argmax(const float (*x)[kTileRows], int64_t C, TileLanes& L) {
  constexpr int R = kTileRows;
  alignas(64) float ok[R], argf[R];
  for (int r = 0; r < R; ++r) L.m[r] = -kInf, ok[r] = 1.0f;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const float v = x[c][r];
      ok[r] = (v == v && v != kInf) ? ok[r] : 0.0f;
      L.m[r] = v > L.m[r] ? v : L.m[r];
    }
  }
  for (int r = 0; r < R; ++r) argf[r] = 0.0f;
  for (int64_t c = C - 1; c >= 0; --c) {
    const float cf = static_cast<float>(c);
#pragma omp simd
    for (int r = 0; r < R; ++r) argf[r] = x[c][r] == L.m[r] ? cf : argf[r];
  }
  for (int r = 0; r < R; ++r) {
    L.arg[r] = static_cast<int32_t>(argf[r]);
    L.bad[r] = L.bad[r] | (ok[r] == 0.0f) | (L.m[r] == -kInf);  // m = -inf: every class masked
    if (L.bad[r]) L.m[r] = 0.0f;
    L.x_y[r] = x[L.yy[r]][r] - L.m[r];  // -inf when the target class is masked: infinite risk
  }
}

// Soft targets: p (after log_target and smoothing) into pt; per row Σ p log p, Σ p, and the
// most probable class as yy.
template <typename target_t>
TILE_STEP void tile_soft_targets(const target_t* tb, const Options& o, int64_t C, int rows,
                                 float (*pt)[kTileRows], TileLanes& L) {
  constexpr int R = kTileRows;
  const int32_t Ci = static_cast<int32_t>(C);
  const float inv_c = 1.0f / static_cast<float>(C);
  const bool log_target = o.log_target;
  const float eps = o.eps;
  alignas(64) float best[R], yf[R], tt[kTileMaxC][R];
  for (int r = 0; r < R; ++r) L.plogp[r] = 0.0f, L.sum_p[r] = 0.0f, best[r] = -kInf, yf[r] = 0.0f;
  convert_tile(tb, Ci, rows, tt);  // transposed in like the logits
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) pt[c][r] = soft_p(tt[c][r], log_target, eps, inv_c);
  }
  for (int64_t c = 0; c < C; ++c) {
    const float cf = static_cast<float>(c);
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const float p = pt[c][r];
      L.plogp[r] += soft_plogp(p);
      L.sum_p[r] += p;
      yf[r] = p > best[r] ? cf : yf[r];
      best[r] = p > best[r] ? p : best[r];
    }
  }
  for (int r = 0; r < R; ++r) L.yy[r] = static_cast<int32_t>(yf[r]);
}

// Exponentials and the sums behind log S, H(q) and the risk: e = exp(z - m), S = Σe,
// U = Σ e·(z - m), Σ (z - m) and Σ p·(z - m); x becomes z - m clamped at kExpFloor.
TILE_STEP void tile_exp_sums(float (*x)[kTileRows], const float (*pt)[kTileRows],
                             const Options& o, int64_t C, float (*e)[kTileRows], TileLanes& L) {
  constexpr int R = kTileRows;
  for (int r = 0; r < R; ++r) L.S[r] = 0.0f, L.U[r] = 0.0f, L.sum_x[r] = 0.0f, L.p_x[r] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const float raw = x[c][r] - L.m[r];
      const float xc = std::max(raw, kExpFloor);
      const float ex_c = fast_exp(xc);  // computed unconditionally: a conditional call blocks SIMD
      const float ex = raw > kExpFloor ? ex_c : 0.0f;  // exactly 0 for a masked class
      e[c][r] = ex;
      L.S[r] += ex;
      L.U[r] += ex * xc;
      L.sum_x[r] += raw;
      if (o.soft) L.p_x[r] += pt[c][r] != 0.0f ? pt[c][r] * raw : 0.0f;  // 0·log 0 = 0
      x[c][r] = xc;
    }
  }
}

// Per row: log S, 1/S, H(q) = log S - U/S, e_y = e at the target, and the risk
// Σ p log p - Σ p log q with log q_c = (z_c - m) - log S.
TILE_STEP void tile_entropy_risk(const float (*e)[kTileRows], const Options& o, TileLanes& L) {
  constexpr int R = kTileRows;
#pragma omp simd
  for (int r = 0; r < R; ++r) {
    L.log_s[r] = fast_log(L.S[r]);
    L.inv_s[r] = 1.0f / L.S[r];
    L.H[r] = L.log_s[r] - L.U[r] * L.inv_s[r];
  }
  for (int r = 0; r < R; ++r) {
    L.e_y[r] = e[L.yy[r]][r];
    if (o.soft) {
      L.risk[r] = L.plogp[r] - L.p_x[r] + L.log_s[r] * L.sum_p[r];
    } else {
      const float cross = (o.eps > 0.0f) ? o.lo * L.sum_x[r] : 0.0f;
      L.risk[r] = o.plogp_class - ((1.0f - o.eps) * L.x_y[r] + cross) + L.log_s[r];
    }
  }
}

// Row weights, losses and stats: one lane per row; the tile's sums reach `part` once. Also
// the per-row loss ('none'), and for the gradient valid_f and coef = w·row_scale (NaN row: NaN).
template <typename scalar_t, typename grad_t, typename target_t>
TILE_STEP void tile_losses(const Problem<scalar_t, grad_t, target_t>& pb, const Options& o,
                           int64_t i0, int rows, TileLanes& L, Sums& part) {
  constexpr int R = kTileRows;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  alignas(64) float maskf[R], live_f[R], rw[R];
  alignas(64) float loss_r[R], hard_r[R], correct_r[R], risk_r[R], ent_r[R], lse_r[R];
  for (int r = 0; r < R; ++r) {
    maskf[r] = pb.mask && r < rows ? static_cast<float>(pb.mask[i0 + r]) : 0.0f;
    rw[r] = r < rows ? pb.weight_of(i0 + r) : 0.0f;
    L.valid_f[r] = L.valid[r] ? 1.0f : 0.0f;
    live_f[r] = L.valid[r] && !L.bad[r] ? 1.0f : 0.0f;  // valid and computable
    correct_r[r] = static_cast<float>(L.valid[r] && !L.bad[r] && L.arg[r] == L.yy[r]);
  }
  const bool has_mask = pb.mask != nullptr;
  const float tau = o.tau, easy_weight = o.easy_weight, beta = o.beta, row_scale = pb.row_scale;
  const float z_loss = o.z_loss;
#pragma omp simd
  for (int r = 0; r < R; ++r) {
    const float q_y = L.e_y[r] * L.inv_s[r];
    const bool hard = has_mask ? maskf[r] != 0.0f : q_y < tau;
    const float w = hard ? 1.0f : easy_weight;
    const float lse = L.m[r] + L.log_s[r];
    const float row_loss = rw[r] * (w * (L.risk[r] + beta * L.H[r]) + z_loss * lse * lse);
    const bool live = live_f[r] != 0.0f;
    const float dead = L.valid_f[r] != 0.0f ? nan : 0.0f;  // NaN row, or an ignored row's 0
    loss_r[r] = live ? row_loss : dead;
    risk_r[r] = live ? L.risk[r] : dead;
    ent_r[r] = live ? L.H[r] : dead;
    lse_r[r] = live ? lse : dead;
    hard_r[r] = live && hard ? 1.0f : 0.0f;
    L.coef[r] = live ? rw[r] * w * row_scale : dead;
    L.zcoef[r] = live ? rw[r] * row_scale * 2.0f * z_loss * lse : 0.0f;
  }
  float t_loss = 0.0f, t_hard = 0.0f, t_correct = 0.0f, t_risk = 0.0f, t_ent = 0.0f;
  for (int r = 0; r < R; ++r) {
    t_loss += loss_r[r], t_hard += hard_r[r], t_correct += correct_r[r];
    t_risk += risk_r[r], t_ent += ent_r[r];
  }
  part.loss += t_loss, part.n_hard += t_hard, part.n_correct += t_correct;
  part.risk += t_risk, part.entropy += t_ent;
  if (pb.loss_rows) std::copy(loss_r, loss_r + rows, pb.loss_rows + i0);
  if (pb.per_token) {
    for (int r = 0; r < rows; ++r) {
      const bool live = live_f[r] != 0.0f;
      const float logprob = live ? L.x_y[r] - L.log_s[r] : ent_r[r];  // ent_r: NaN or 0
      pb.put_token(i0 + r, logprob, ent_r[r], correct_r[r], lse_r[r]);
    }
  }
}

// Gradient (into e; 0 on ignored rows whatever their logits):
// coef·[(q·Σp - p) - β·q⊙(log q + H)], with log q = x - log S.
TILE_STEP void tile_gradient(const float (*x)[kTileRows], const float (*pt)[kTileRows],
                             const Options& o, int64_t C, float (*e)[kTileRows],
                             const TileLanes& L) {
  constexpr int R = kTileRows;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int r = 0; r < R; ++r) {
      const float q = e[c][r] * L.inv_s[r];
      float d;
      if (o.soft) {
        d = q * L.sum_p[r] - pt[c][r];
      } else {
        d = q - (c == L.yy[r] ? o.hi : o.lo);
      }
      if (o.beta != 0.0f) d -= o.beta * q * (x[c][r] - L.log_s[r] + L.H[r]);
      e[c][r] = L.valid_f[r] != 0.0f ? L.coef[r] * d + L.zcoef[r] * q : 0.0f;
    }
  }
}

// x[c][r] -> rows [rows][C] (row-major) in dst's dtype, with the AVX-512 transposes where it is
// fp32; nothing is written past `rows`.
template <typename T>
TILE_STEP void store_tile(float (*x)[kTileRows], int32_t C, int rows, T* dst) {
  if constexpr (kHasTranspose16 && std::is_same_v<T, float>) {
    transpose_out(x, C, rows, dst);
  } else {
    for (int32_t r = 0; r < rows; ++r)
      for (int32_t c = 0; c < C; ++c) dst[r * C + c] = static_cast<T>(x[c][r]);
  }
}

#undef TILE_STEP

// Rows [i0, i0 + kTileRows) (fewer in the last tile): loss, stats and gradient, step by step.
template <typename scalar_t, typename grad_t, typename target_t>
void tile_rows(const Problem<scalar_t, grad_t, target_t>& pb, const Options& o, int64_t i0,
               Sums& part) {
  constexpr int R = kTileRows;
  const int64_t C = pb.C;
  const int32_t Ci = static_cast<int32_t>(C);
  const int rows = static_cast<int>(std::min<int64_t>(R, pb.N - i0));

  alignas(64) float x[kTileMaxC][R];  // logits, then z - m clamped at kExpFloor
  alignas(64) float e[kTileMaxC][R];  // exp(z - m), later the gradient
  alignas(64) float pt[kTileMaxC][R];  // soft targets: p
  TileLanes L;                         // the per-row values

  tile_targets(pb, o, i0, rows, L);
  load_tile(pb.z + i0 * C, Ci, rows, x);  // the tile's rows (one contiguous block), transposed in
  tile_max_argmax(x, C, L);
  if (o.soft) {
    tile_soft_targets(pb.p + i0 * C, o, C, rows, pt, L);
    for (int r = 0; r < R; ++r) L.x_y[r] = x[L.yy[r]][r] - L.m[r];  // at the soft argmax
  }
  tile_exp_sums(x, pt, o, C, e, L);
  tile_entropy_risk(e, o, L);
  tile_losses(pb, o, i0, rows, L, part);
  if (!pb.grad) return;
  tile_gradient(x, pt, o, C, e, L);
  store_tile(e, Ci, rows, pb.grad + i0 * C);  // the gradient, written back row-major
}

// --- wide rows: one row at a time, SIMD along the row --------------------------------------

// Max over c in [0, C) of load(c), the first c where it occurs, and whether a value was NaN or
// +inf: kLanes columns at a time, each lane keeping its own max and the first column where it
// occurred (a scalar argmax loop does not vectorise).
struct LaneMax {
  float max;
  int64_t arg;
  bool nonfinite;
};
template <typename Load>
LaneMax lane_max(int64_t C, Load load) {
  constexpr int64_t kLanes = 16;
  alignas(64) float lane_m[kLanes], lane_arg[kLanes], lane_ok[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane_m[l] = -kInf, lane_arg[l] = 0.0f, lane_ok[l] = 1.0f;
  const int64_t C_body = C / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < C_body; c0 += kLanes) {
    const float cf = static_cast<float>(c0);  // exact: C < 2^24
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = load(c0 + l);
      lane_ok[l] = (v == v && v != kInf) ? lane_ok[l] : 0.0f;
      const bool more = v > lane_m[l];
      lane_arg[l] = more ? cf + static_cast<float>(l) : lane_arg[l];
      lane_m[l] = more ? v : lane_m[l];
    }
  }
  for (int64_t c = C_body; c < C; ++c) {  // the tail: lane l takes column C_body + l
    const int64_t l = c - C_body;
    const float v = load(c);
    lane_ok[l] = (v == v && v != kInf) ? lane_ok[l] : 0.0f;
    if (v > lane_m[l]) lane_m[l] = v, lane_arg[l] = static_cast<float>(c);
  }
  LaneMax out{-kInf, C, false};
  float arg_f = static_cast<float>(C);
  for (int64_t l = 0; l < kLanes; ++l) {
    out.nonfinite |= lane_ok[l] == 0.0f;
    if (lane_m[l] > out.max || (lane_m[l] == out.max && lane_arg[l] < arg_f)) {
      out.max = lane_m[l], arg_f = lane_arg[l];
    }
  }
  out.arg = out.max == -kInf ? 0 : static_cast<int64_t>(arg_f);
  return out;
}


template <typename scalar_t, typename grad_t, typename target_t>
void wide_row(const Problem<scalar_t, grad_t, target_t>& pb, const Options& o, int64_t i,
              float* e, float* p, Sums& part) {
  const int64_t C = pb.C;
  const scalar_t* z = pb.z + i * C;
  grad_t* g = pb.grad ? pb.grad + i * C : nullptr;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inv_c = 1.0f / static_cast<float>(C);

  int64_t y = 0;
  float sum_p = 1.0f;
  double plogp = o.plogp_class;
  if (o.soft) {
    const target_t* t = pb.p + i * C;
    const bool log_target = o.log_target;
    const float eps = o.eps;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) p[c] = soft_p(to_float(t[c]), log_target, eps, inv_c);
    double acc = 0.0, acc_plogp = 0.0;  // fp64: Σp over a 150k vocabulary must stay exact
#pragma omp simd reduction(+ : acc, acc_plogp)
    for (int64_t c = 0; c < C; ++c) {
      acc += p[c];
      acc_plogp += soft_plogp(p[c]);
    }
    y = lane_max(C, [p](int64_t c) { return p[c]; }).arg;
    sum_p = static_cast<float>(acc);
    plogp = acc_plogp;
  } else {
    y = pb.y[i];
    if (y == o.ignore_index) {
      if (pb.loss_rows) pb.loss_rows[i] = 0.0f;
      pb.put_token(i, 0.0f, 0.0f, 0.0f, 0.0f);
      if (g) std::fill(g, g + C, grad_t(0));
      return;
    }
  }

  // Pass 1: max, argmax (first maximum) and the NaN / +inf check.
  const LaneMax zmax = lane_max(C, [z](int64_t c) { return to_float(z[c]); });
  const float m = zmax.max;
  const int64_t arg = zmax.arg;
  const bool nonfinite = zmax.nonfinite;
  if (nonfinite || m == -kInf || !(y >= 0 && y < C)) {  // m = -inf: every class masked
    part.loss += nan, part.risk += nan, part.entropy += nan;
    if (pb.loss_rows) pb.loss_rows[i] = nan;
    pb.put_token(i, nan, nan, 0.0f, nan);
    if (g) std::fill(g, g + C, grad_t(nan));
    return;
  }

  // Pass 2: exponentials into the row buffer, S = Σe, U = Σ e·(z - m).
  float S = 0.0f, U = 0.0f;
#pragma omp simd reduction(+ : S, U)
  for (int64_t c = 0; c < C; ++c) {
    const float raw = to_float(z[c]) - m;
    const float xc = std::max(raw, kExpFloor);
    const float ex_c = fast_exp(xc);  // computed unconditionally: a conditional call blocks SIMD
      const float ex = raw > kExpFloor ? ex_c : 0.0f;  // exactly 0 for a masked class
    e[c] = ex;
    S += ex;
    U += ex * xc;
  }
  const float log_s = std::log(S);
  const float inv_s = 1.0f / S;
  const float H = log_s - U * inv_s;

  // risk = Σ p log p - Σ p log q,  log q_c = (z_c - m) - log S.
  float risk;
  const float x_y = to_float(z[y]) - m;  // read before pass 3 may overwrite z (in place)
  if (o.soft) {
    double p_x = 0.0;
#pragma omp simd reduction(+ : p_x)
    for (int64_t c = 0; c < C; ++c) {
      const float pc = p[c];
      p_x += pc != 0.0f ? pc * (to_float(z[c]) - m) : 0.0f;  // 0·log 0 = 0
    }
    risk = static_cast<float>(plogp - p_x + static_cast<double>(log_s) * sum_p);
  } else {
    float sum_x = 0.0f;
    if (o.eps > 0.0f) {
#pragma omp simd reduction(+ : sum_x)
      for (int64_t c = 0; c < C; ++c) sum_x += to_float(z[c]) - m;
    }
    risk = o.plogp_class - ((1.0f - o.eps) * x_y + o.lo * sum_x) + log_s;
  }

  const float q_y = e[y] * inv_s;
  const bool hard = pb.mask ? pb.mask[i] : (q_y < o.tau);
  const float w = hard ? 1.0f : o.easy_weight;
  const float rw = pb.weight_of(i);
  const float lse = m + log_s;
  const float row_loss = rw * (w * (risk + o.beta * H) + o.z_loss * lse * lse);
  if (pb.loss_rows) pb.loss_rows[i] = row_loss;
  pb.put_token(i, x_y - log_s, H, static_cast<float>(arg == y), lse);
  part.loss += row_loss;
  part.n_hard += hard;
  part.n_correct += (arg == y);
  part.risk += risk;
  part.entropy += H;
  if (!g) return;

  // Pass 3: the gradient of the (reduced) loss w.r.t. this row's logits.
  // d(loss)/dz_c = rw·row_scale·(w·d_c + 2λ·lse·q_c): s·d_c + t·q_c.
  const float s = rw * w * pb.row_scale;
  const float t = rw * pb.row_scale * 2.0f * o.z_loss * lse;
  const float beta = o.beta;
  if (o.soft) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float q = e[c] * inv_s;
      float d = q * sum_p - p[c];
      if (beta != 0.0f) d -= beta * q * (std::max(to_float(z[c]) - m, kExpFloor) - log_s + H);
      g[c] = static_cast<grad_t>(s * d + t * q);
    }
  } else {
    const float lo = o.lo;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float q = e[c] * inv_s;
      float d = q - lo;
      if (beta != 0.0f) d -= beta * q * (std::max(to_float(z[c]) - m, kExpFloor) - log_s + H);
      g[c] = static_cast<grad_t>(s * d + t * q);
    }
    const float q = e[y] * inv_s;
    float d = q - o.hi;
    if (beta != 0.0f) d -= beta * q * (std::max(x_y, kExpFloor) - log_s + H);
    g[y] = static_cast<grad_t>(s * d + t * q);
  }
}

template <typename scalar_t, typename grad_t, typename target_t>
Sums run_rows(const Problem<scalar_t, grad_t, target_t>& pb, const Options& o) {
  Sums total;
  std::mutex merge;
  const int64_t C = pb.C;
  if (C <= kTileMaxC) {
    const int64_t tiles = (pb.N + kTileRows - 1) / kTileRows;
    const int64_t grain = std::max<int64_t>(1, 4096 / (kTileRows * C));
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      Sums part;
      for (int64_t t = begin; t < end; ++t) tile_rows(pb, o, t * kTileRows, part);
      std::lock_guard<std::mutex> lock(merge);
      total.add(part);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 16384 / C);
    at::parallel_for(0, pb.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> e(C), p(o.soft ? C : 0);
      Sums part;
      for (int64_t i = begin; i < end; ++i) wide_row(pb, o, i, e.data(), p.data(), part);
      std::lock_guard<std::mutex> lock(merge);
      total.add(part);
    });
  }
  return total;
}

// Class targets: N_valid, and (when validate) a ValueError for a target outside [0, C) that is
// not ignore_index, raised before anything is written.
int64_t count_valid(const at::Tensor& target, int64_t C, int64_t ignore_index, bool validate) {
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t N = target.numel();
  int64_t n_valid = 0, first_bad = -1;
  for (int64_t i = 0; i < N; ++i) {
    const bool valid = y[i] != ignore_index;
    n_valid += valid;
    if (valid && (y[i] < 0 || y[i] >= C) && first_bad < 0) first_bad = i;
  }
  TORCH_CHECK_VALUE(!validate || first_bad < 0, "target value ",
                    first_bad >= 0 ? y[first_bad] : 0, " is outside [0, ", C,
                    ") and is not ignore_index=", ignore_index);
  return n_valid;
}

}  // namespace

// The names of the sums efe_forward returns, in order (qwenrl.loss.options.SUM_FIELDS).
constexpr const char* kSumFields[] = {"n_hard", "n_correct", "risk", "entropy", "n_valid"};
// The rows of the per-token buffer, in order (qwenrl.loss.reference.PER_TOKEN_FIELDS).
constexpr const char* kPerTokenFields[] = {"logprob", "entropy", "correct", "lse"};

// Returns (loss, sums, per_token): loss fp32 [N] for reduction 'none', else a 0-dim fp32 tensor;
// sums fp32 [5] = kSumFields: (n_hard, n_correct, Σ risk, Σ entropy, n_valid); per_token fp32
// [4, N] = kPerTokenFields when asked for, else empty. Each row's loss is multiplied by
// row_weight (if given) and gains z_loss·lse². Writes the gradient into `grad` if given: same
// shape as the logits, their dtype or float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> efe_forward(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& hard_mask,
    const c10::optional<at::Tensor>& row_weight, const c10::optional<at::Tensor>& grad, bool soft,
    bool log_target, double tau, double easy_weight, double entropy_weight,
    double label_smoothing, double z_loss, int64_t ignore_index, const std::string& reduction,
    bool validate, bool per_token) {
  TORCH_CHECK(logits.device().is_cpu(), "efe_forward: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2, "efe_forward: logits must be [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "efe_forward: logits must be contiguous");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "efe_forward: logits must be float32, bfloat16 or float16, got ", dtype);
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "efe_forward: need at least one class");
  TORCH_CHECK(target.is_contiguous() && target.device().is_cpu(),
              "efe_forward: target must be a contiguous CPU tensor");
  if (soft) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "efe_forward: soft target shape ",
                target.sizes(), " != logits shape ", logits.sizes());
    TORCH_CHECK(target.scalar_type() == at::kFloat || target.scalar_type() == dtype,
                "efe_forward: soft target must be float32 or the logits' dtype");
  } else {
    TORCH_CHECK(!log_target, "efe_forward: log_target needs a soft target");
    TORCH_CHECK(target.scalar_type() == at::kLong, "efe_forward: class target must be int64");
    TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "efe_forward: target shape ",
                target.sizes(), " != [", N, "]");
  }
  const bool* mask = nullptr;
  if (hard_mask.has_value()) {
    const auto& hm = *hard_mask;
    TORCH_CHECK(hm.scalar_type() == at::kBool && hm.dim() == 1 && hm.size(0) == N &&
                    hm.is_contiguous() && hm.device().is_cpu(),
                "efe_forward: hard_mask must be a contiguous bool [N] CPU tensor");
    mask = hm.data_ptr<bool>();
  }
  const float* weight_ptr = nullptr;
  if (row_weight.has_value()) {
    const auto& rw = *row_weight;
    TORCH_CHECK_TYPE(rw.scalar_type() == at::kFloat,
                     "efe_forward: row_weight must be float32, got ", rw.scalar_type());
    TORCH_CHECK_VALUE(rw.dim() == 1 && rw.size(0) == N && rw.is_contiguous() &&
                          rw.device().is_cpu(),
                      "efe_forward: row_weight must be a contiguous [", N, "] CPU tensor, got ",
                      rw.sizes());
    weight_ptr = rw.data_ptr<float>();
  }
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->is_contiguous() &&
                    grad->device().is_cpu() &&
                    (grad->scalar_type() == dtype || grad->scalar_type() == at::kFloat),
                "efe_forward: grad must be a contiguous CPU tensor shaped like the logits, in "
                "their dtype or float32");
  }

  Options o{soft, log_target, static_cast<float>(tau), static_cast<float>(easy_weight),
            static_cast<float>(entropy_weight), static_cast<float>(label_smoothing),
            ignore_index, parse_reduction(reduction), static_cast<float>(z_loss)};
  o.hoist(C);
  const int64_t n_valid = soft ? N : count_valid(target, C, ignore_index, validate);
  const double denom = static_cast<double>(std::max<int64_t>(n_valid, 1));
  const float row_scale = o.reduction == Reduction::kMean ? static_cast<float>(1.0 / denom) : 1.0f;

  auto opts_f = logits.options().dtype(at::kFloat);
  at::Tensor loss_rows = o.reduction == Reduction::kNone ? at::empty({N}, opts_f) : at::Tensor();
  float* loss_ptr = loss_rows.defined() ? loss_rows.data_ptr<float>() : nullptr;
  at::Tensor token_rows = at::empty({per_token ? 4 : 0, per_token ? N : 0}, opts_f);
  float* token_ptr = per_token ? token_rows.data_ptr<float>() : nullptr;
  if (!per_token) token_rows = at::empty({0}, opts_f);
  const bool* mask_ptr = mask;
  Sums total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "efe_forward", [&] {
    using logits_t = scalar_t;
    auto with_grad = [&](auto* grad_ptr) {
      using grad_t = std::remove_pointer_t<decltype(grad_ptr)>;
      auto with_target = [&](auto* soft_ptr) {
        using target_t = std::remove_const_t<std::remove_pointer_t<decltype(soft_ptr)>>;
        Problem<logits_t, grad_t, target_t> pb{
            logits.data_ptr<logits_t>(), soft ? nullptr : target.data_ptr<int64_t>(), soft_ptr,
            mask_ptr, grad_ptr, loss_ptr, N, C, row_scale, weight_ptr, token_ptr};
        total = run_rows(pb, o);
      };
      if (soft && target.scalar_type() != at::kFloat) {
        with_target(target.data_ptr<logits_t>());
      } else {
        with_target(soft ? target.data_ptr<float>() : static_cast<float*>(nullptr));
      }
    };
    if (!grad.has_value()) {
      with_grad(static_cast<logits_t*>(nullptr));
    } else if (grad->scalar_type() == dtype) {
      with_grad(grad->data_ptr<logits_t>());
    } else {
      with_grad(grad->data_ptr<float>());
    }
  });

  at::Tensor loss = loss_rows;
  if (o.reduction != Reduction::kNone) {
    loss = at::scalar_tensor(o.reduction == Reduction::kMean ? total.loss / denom : total.loss,
                             opts_f);
  }
  // In the order of kSumFields (exported as SUM_FIELDS, checked against Python's at load).
  at::Tensor sums = at::tensor(
      {static_cast<float>(total.n_hard), static_cast<float>(total.n_correct),
       static_cast<float>(total.risk), static_cast<float>(total.entropy),
       static_cast<float>(n_valid)},
      opts_f);
  return {loss, sums, token_rows};
}

void init_efe_loss(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("efe_forward", &efe_forward,
        "Fused EFE loss: returns (loss, sums) and writes the gradient into grad (if given). "
        "Options are keyword-only, named as qwenrl.loss.EFEOptions.",
        py::arg("logits"), py::arg("target"), py::arg("hard_mask"), py::arg("row_weight"),
        py::arg("grad"), py::kw_only(), py::arg("soft"), py::arg("log_target"), py::arg("tau"),
        py::arg("easy_weight"), py::arg("entropy_weight"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("ignore_index"), py::arg("reduction"), py::arg("validate"),
        py::arg("per_token"));
  py::tuple sum_fields(std::size(kSumFields));
  for (std::size_t i = 0; i < std::size(kSumFields); ++i) sum_fields[i] = kSumFields[i];
  m.attr("SUM_FIELDS") = sum_fields;
  py::tuple token_fields(std::size(kPerTokenFields));
  for (std::size_t i = 0; i < std::size(kPerTokenFields); ++i) token_fields[i] = kPerTokenFields[i];
  m.attr("PER_TOKEN_FIELDS") = token_fields;
  m.def("empty_grad", &empty_grad,
        "Uninitialised buffer for a fused gradient (huge-page backed when large)",
        py::arg("sizes"), py::arg("dtype"));
}
