// Fused expected-free-energy loss on the CPU (DESIGN.md §2): loss, stats and gradient in one
// pass over the rows. The calling convention is shared with the Triton kernel and documented in
// qwenrl/loss/efe.py; qwenrl/loss/reference.py is the spec.
//
// Per row (all math in fp32, sums in fp64):
//   pass 1  max, argmax and a non-finite check over z            (reads z)
//   pass 2  e = exp(z - m) into a per-thread row buffer, S = Σe,   (reads z)
//           U = Σ e·(z - m)  ->  lse = m + log S,  H(q) = log S - U/S
//   pass 3  gradient  w·s·[(q·Σp - p) - β·q⊙(log q + H)]           (writes grad)
// For the ARC shape (C = 12) a row is 48 bytes, so the re-reads hit L1; for an LLM vocabulary
// the row buffer (C floats) stays in L2. No [N, C] temporary is allocated besides `grad`.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace {

constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;

// exp(x) for x <= 0, in a form the compiler vectorises (no libm call): 2^n · P(r) with the
// Cephes single-precision polynomial; below -87.3 it returns ~1e-38 (q is effectively 0).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
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

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

struct Options {
  bool soft;
  bool log_target;
  float tau;
  float easy_weight;
  float beta;
  float eps;
  int64_t ignore_index;
  int64_t reduction;
};

// Per-chunk partial sums, merged under a mutex once per chunk.
struct Sums {
  double loss = 0, n_hard = 0, n_correct = 0, risk = 0, entropy = 0;
};

// Copies row `i` of a soft target into `out` as fp32 probabilities p (after log_target and
// label smoothing) and `logp` (log p, 0·log 0 handled by the caller through p == 0).
template <typename target_t>
void load_soft_row(const target_t* row, int64_t C, const Options& o, float* p, float* logp) {
  const float keep = 1.0f - o.eps, floor_p = o.eps / static_cast<float>(C);
  for (int64_t c = 0; c < C; ++c) {
    const float t = to_float(row[c]);
    if (o.log_target && o.eps == 0.0f) {
      p[c] = std::exp(t);
      logp[c] = t;
    } else {
      const float prob = (o.log_target ? std::exp(t) : t) * keep + floor_p;
      p[c] = prob;
      logp[c] = prob > 0.0f ? std::log(prob) : 0.0f;
    }
  }
}

template <typename scalar_t, typename target_t>
void efe_rows(const scalar_t* z_all, const void* target_raw, const bool* mask, scalar_t* grad_all,
              float* loss_rows, int64_t N, int64_t C, float row_scale, const Options& o,
              Sums& total) {
  std::mutex merge;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> e(C), p, logp;
    if (o.soft) {
      p.resize(C);
      logp.resize(C);
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float Cf = static_cast<float>(C);
    Sums part;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* z = z_all + i * C;
      scalar_t* g = grad_all ? grad_all + i * C : nullptr;

      // Target of this row: class index y (or argmax P) and validity.
      int64_t y = 0;
      float sum_p = 1.0f;
      if (o.soft) {
        load_soft_row(static_cast<const target_t*>(target_raw) + i * C, C, o, p.data(),
                      logp.data());
        float best = -std::numeric_limits<float>::infinity();
        double acc = 0.0;  // fp64: Σp over a 150k vocabulary must stay exact to ~1e-7
        for (int64_t c = 0; c < C; ++c) {
          acc += p[c];
          if (p[c] > best) best = p[c], y = c;
        }
        sum_p = static_cast<float>(acc);
      } else {
        y = static_cast<const int64_t*>(target_raw)[i];
        if (y == o.ignore_index) {
          if (loss_rows) loss_rows[i] = 0.0f;
          if (g) std::fill(g, g + C, scalar_t(0));
          continue;
        }
      }
      const bool y_ok = y >= 0 && y < C;

      // Pass 1: max, argmax, non-finite check (z - z is NaN for ±inf and NaN).
      float m = -std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      float bad = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        const float v = to_float(z[c]);
        bad += v - v;
        if (v > m) m = v, arg = c;
      }
      if (bad != 0.0f || !y_ok) {  // NaN/Inf logits or an unchecked bad target: NaN row
        part.loss += nan;
        part.risk += nan;
        part.entropy += nan;
        if (loss_rows) loss_rows[i] = nan;
        if (g) std::fill(g, g + C, scalar_t(nan));
        continue;
      }

      // Pass 2: exponentials into the row buffer, S = Σe, U = Σ e·(z - m).
      float S = 0.0f, U = 0.0f;
#pragma omp simd reduction(+ : S, U)
      for (int64_t c = 0; c < C; ++c) {
        const float x = std::max(to_float(z[c]) - m, -87.3f);
        const float ex = exp_nonpositive(x);
        e[c] = ex;
        S += ex;
        U += ex * x;
      }
      const float log_s = std::log(S);
      const float inv_s = 1.0f / S;
      const float H = log_s - U * inv_s;  // H(q) = log S - Σ q·(z - m)

      // risk = Σ p log p - Σ p log q,  log q_c = (z_c - m) - log S.
      float risk;
      const float x_y = to_float(z[y]) - m;  // read before pass 3 may overwrite z (in place)
      if (o.soft) {
        double plogp = 0.0, p_x = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          if (p[c] > 0.0f) plogp += p[c] * logp[c];
          p_x += p[c] * (to_float(z[c]) - m);
        }
        risk = static_cast<float>(plogp - p_x + static_cast<double>(log_s) * sum_p);
      } else {
        const float hi = 1.0f - o.eps + o.eps / Cf, lo = o.eps / Cf;
        float plogp = hi * std::log(hi);
        if (lo > 0.0f) plogp += (Cf - 1.0f) * lo * std::log(lo);
        float sum_x = 0.0f;
        if (o.eps > 0.0f) {
#pragma omp simd reduction(+ : sum_x)
          for (int64_t c = 0; c < C; ++c) sum_x += to_float(z[c]) - m;
        }
        risk = plogp - ((1.0f - o.eps) * x_y + lo * sum_x) + log_s;
      }

      const float q_y = e[y] * inv_s;
      const bool hard = mask ? mask[i] : (q_y < o.tau);
      const float w = o.easy_weight + (1.0f - o.easy_weight) * (hard ? 1.0f : 0.0f);
      const float row_loss = w * (risk + o.beta * H);
      if (loss_rows) loss_rows[i] = row_loss;
      part.loss += row_loss;
      part.n_hard += hard;
      part.n_correct += (arg == y);
      part.risk += risk;
      part.entropy += H;

      // Pass 3: the gradient of the (reduced) loss w.r.t. this row's logits.
      if (g) {
        const float s = w * row_scale;
        const float qs = inv_s * sum_p;
        if (o.soft) {
          for (int64_t c = 0; c < C; ++c) {
            const float q = e[c] * inv_s;
            float d = e[c] * qs - p[c];
            if (o.beta != 0.0f) d -= o.beta * q * ((to_float(z[c]) - m) - log_s + H);
            g[c] = scalar_t(s * d);
          }
        } else {
          const float lo = o.eps / Cf;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float q = e[c] * inv_s;
            float d = q - lo;
            if (o.beta != 0.0f) d -= o.beta * q * ((to_float(z[c]) - m) - log_s + H);
            g[c] = scalar_t(s * d);
          }
          const float q = e[y] * inv_s;
          float d = q - lo - (1.0f - o.eps);
          if (o.beta != 0.0f) d -= o.beta * q * (x_y - log_s + H);
          g[y] = scalar_t(s * d);
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    total.loss += part.loss;
    total.n_hard += part.n_hard;
    total.n_correct += part.n_correct;
    total.risk += part.risk;
    total.entropy += part.entropy;
  });
}

template <typename scalar_t>
void dispatch_target(const at::Tensor& z, const at::Tensor& target, const bool* mask,
                     scalar_t* grad, float* loss_rows, float row_scale, const Options& o,
                     Sums& total) {
  const int64_t N = z.size(0), C = z.size(1);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  if (!o.soft || target.scalar_type() == at::kFloat) {
    efe_rows<scalar_t, float>(zp, target.data_ptr(), mask, grad, loss_rows, N, C, row_scale, o,
                              total);
  } else {  // soft target in the logits' own dtype
    efe_rows<scalar_t, scalar_t>(zp, target.data_ptr(), mask, grad, loss_rows, N, C, row_scale,
                                 o, total);
  }
}

}  // namespace

// Returns (loss, sums): loss fp32 [N] for reduction 'none', else a 0-dim fp32 tensor; sums fp32
// [5] = (n_hard, n_correct, Σ risk, Σ entropy, n_valid). Writes the gradient into `grad` if given.
std::tuple<at::Tensor, at::Tensor> efe_forward(const at::Tensor& logits, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& hard_mask,
                                               const c10::optional<at::Tensor>& grad, bool soft,
                                               bool log_target, double tau, double easy_weight,
                                               double entropy_weight, double label_smoothing,
                                               int64_t ignore_index, int64_t reduction) {
  TORCH_CHECK(logits.device().is_cpu(), "efe_forward: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2, "efe_forward: logits must be [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "efe_forward: logits must be contiguous");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "efe_forward: logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "efe_forward: bad reduction ", reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "efe_forward: need at least one class");
  TORCH_CHECK(target.is_contiguous(), "efe_forward: target must be contiguous");
  if (soft) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "efe_forward: soft target shape ",
                target.sizes(), " != logits shape ", logits.sizes());
    TORCH_CHECK(target.scalar_type() == at::kFloat || target.scalar_type() == dtype,
                "efe_forward: soft target must be float32 or the logits' dtype");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "efe_forward: class target must be int64");
    TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "efe_forward: target shape ",
                target.sizes(), " != [", N, "]");
  }
  const bool* mask = nullptr;
  if (hard_mask.has_value()) {
    const auto& hm = *hard_mask;
    TORCH_CHECK(hm.scalar_type() == at::kBool && hm.dim() == 1 && hm.size(0) == N &&
                    hm.is_contiguous(),
                "efe_forward: hard_mask must be a contiguous bool [N] tensor");
    mask = hm.data_ptr<bool>();
  }
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == dtype &&
                    grad->is_contiguous() && grad->device().is_cpu(),
                "efe_forward: grad must be a contiguous CPU tensor like logits");
  }

  Options o{soft,
            log_target,
            static_cast<float>(tau),
            static_cast<float>(easy_weight),
            static_cast<float>(entropy_weight),
            static_cast<float>(label_smoothing),
            ignore_index,
            reduction};
  const double n_valid =
      soft ? static_cast<double>(N) : static_cast<double>((target != ignore_index).sum().item<int64_t>());
  const float row_scale = reduction == kReductionMean ? 1.0f / std::max(n_valid, 1.0) : 1.0f;

  auto opts_f = logits.options().dtype(at::kFloat);
  at::Tensor loss_rows = reduction == kReductionNone ? at::empty({N}, opts_f) : at::Tensor();
  Sums total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "efe_forward", [&] {
    dispatch_target<scalar_t>(logits, target, mask,
                              grad.has_value() ? grad->data_ptr<scalar_t>() : nullptr,
                              loss_rows.defined() ? loss_rows.data_ptr<float>() : nullptr,
                              row_scale, o, total);
  });

  at::Tensor loss = loss_rows;
  if (reduction != kReductionNone) {
    const double value = reduction == kReductionMean ? total.loss / std::max(n_valid, 1.0) : total.loss;
    loss = at::scalar_tensor(value, opts_f);
  }
  at::Tensor sums = at::tensor({static_cast<float>(total.n_hard), static_cast<float>(total.n_correct),
                                static_cast<float>(total.risk), static_cast<float>(total.entropy),
                                static_cast<float>(n_valid)},
                               opts_f);
  return {loss, sums};
}

void init_efe_loss(pybind11::module_& m) {
  m.def("efe_forward", &efe_forward, "Fused EFE loss: (loss, sums), gradient written into grad",
        pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("hard_mask"),
        pybind11::arg("grad"), pybind11::arg("soft"), pybind11::arg("log_target"),
        pybind11::arg("tau"), pybind11::arg("easy_weight"), pybind11::arg("entropy_weight"),
        pybind11::arg("label_smoothing"), pybind11::arg("ignore_index"),
        pybind11::arg("reduction"));
}
