// Fused RG-LRU for CPU: the gates' sigmoids, a_t, sqrt(1 - a_t^2), the input scaling and the
// recurrence h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * i_t * u_t in one pass over time, and the
// whole backward in one reverse pass. The eager version in chimera/rglru.py makes about 25
// passes over (B, T, width) fp32 tensors; on CPU those passes, not the arithmetic, are the cost.
//
// Layouts (fp32; checked below, and the Python wrapper sends only these):
//   u      (B, T, W) contiguous
//   gates  (B, T, n, 2 * blk) with unit stride in the last dim (input gate | a gate per head),
//          any other strides (the block-diagonal gate matmul hands over a block-major view)
//   a_logit (W,)   h0 (B, W) or empty
//   reset  (B, T) bool or empty: a document starts here, so a_t = 0 (and then sqrt(1 - a_t^2)
//          = 1): h_t = i_t * u_t. The backward needs no case of its own: with a_t = 0 every
//          term through a_t (the carry, dL/dlog a, the a gate) vanishes by the same formulas.
// A work item walks one batch element (or a range of its heads) through time; the inner loop
// over one head's channels is contiguous, so the compiler vectorises it (exp via libmvec).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kC = 8.0f;                  // Griffin's c
constexpr float kMinM = 1.0f / (2.0f * 1000.0f);  // caps d sqrt(x)/dx at 1000, as the reference
constexpr float kLogitClamp = 80.0f;        // keeps exp finite (built with -ffast-math)

inline float sigmoid(float x) {
  x = std::min(std::max(x, -kLogitClamp), kLogitClamp);
  return 1.0f / (1.0f + std::exp(-x));
}

struct Geometry {
  int64_t batch, length, width, heads, blk;
  int64_t g_batch, g_time, g_head;  // strides of gates in elements
};

Geometry geometry(const at::Tensor& u, const at::Tensor& gates) {
  TORCH_CHECK(u.dim() == 3 && u.is_contiguous() && u.scalar_type() == at::kFloat,
              "rglru: u must be a contiguous float32 (B, T, W) tensor");
  TORCH_CHECK(gates.dim() == 4 && gates.scalar_type() == at::kFloat && gates.stride(3) == 1,
              "rglru: gates must be float32 (B, T, n, 2 * blk) with unit inner stride");
  Geometry g{u.size(0), u.size(1), u.size(2), gates.size(2), gates.size(3) / 2,
             gates.stride(0), gates.stride(1), gates.stride(2)};
  TORCH_CHECK(gates.size(0) == g.batch && gates.size(1) == g.length &&
              g.heads * g.blk == g.width && gates.size(3) == 2 * g.blk,
              "rglru: gates shape does not match u");
  return g;
}

void check_state(const Geometry& g, const at::Tensor& a_logit, const at::Tensor& h0) {
  TORCH_CHECK(a_logit.scalar_type() == at::kFloat && a_logit.numel() == g.width,
              "rglru: a_logit must be float32 (W,)");
  TORCH_CHECK(h0.numel() == 0 || (h0.scalar_type() == at::kFloat && h0.dim() == 2 &&
                                  h0.size(0) == g.batch && h0.size(1) == g.width),
              "rglru: h0 must be empty or float32 (B, W)");
}

// The reset flags as a (B * T) byte array, or nullptr without resets.
const bool* reset_flags(const Geometry& g, const at::Tensor& reset) {
  if (reset.numel() == 0) return nullptr;
  TORCH_CHECK(reset.scalar_type() == at::kBool && reset.is_contiguous() && reset.dim() == 2 &&
                  reset.size(0) == g.batch && reset.size(1) == g.length,
              "rglru: reset must be empty or a contiguous bool (B, T) tensor");
  return reset.data_ptr<bool>();
}

// One time step of one head's channels. Separate functions with restrict pointers so that gcc
// vectorises the channel loop without run-time aliasing checks.
// keep is 0 at a document's first token, else 1.
inline void forward_step(int64_t n, const float* __restrict__ u, const float* __restrict__ gx,
                         const float* __restrict__ ga, const float* __restrict__ scale,
                         float keep, float* __restrict__ state, float* __restrict__ h) {
  for (int64_t j = 0; j < n; ++j) {
    const float r = sigmoid(ga[j]);
    const float i = sigmoid(gx[j]);
    const float a = keep * std::exp(r * scale[j]);
    const float m = std::sqrt(std::max(0.0f, 1.0f - a * a));
    state[j] = a * state[j] + m * i * u[j];
    h[j] = state[j];
  }
}

// carry holds a_{t+1} dL/dh_{t+1} on entry and a_t dL/dh_t on exit; acc sums dL/dscale.
inline void backward_step(int64_t n, const float* __restrict__ u, const float* __restrict__ gx,
                          const float* __restrict__ ga, const float* __restrict__ scale,
                          float keep, const float* __restrict__ grad_h,
                          const float* __restrict__ h_prev,
                          float* __restrict__ carry, float* __restrict__ acc,
                          float* __restrict__ grad_u, float* __restrict__ grad_gx,
                          float* __restrict__ grad_ga) {
  for (int64_t j = 0; j < n; ++j) {
    const float r = sigmoid(ga[j]);
    const float i = sigmoid(gx[j]);
    const float a = keep * std::exp(r * scale[j]);
    const float m = std::sqrt(std::max(0.0f, 1.0f - a * a));
    const float gt = grad_h[j] + carry[j];  // dL/dh_t
    const float gtu = gt * u[j];
    const float grad_m = gtu * i;
    grad_u[j] = gt * m * i;
    // a = exp(log a), m = sqrt(1 - a^2): dm/dlog a = -a^2 / m (m bounded below)
    const float grad_log_a = gt * h_prev[j] * a - grad_m * a * a / std::max(m, kMinM);
    acc[j] += grad_log_a * r;
    grad_gx[j] = grad_m * m * (1.0f - i);
    grad_ga[j] = grad_log_a * scale[j] * r * (1.0f - r);
    carry[j] = a * gt;
  }
}

// -c * softplus(-Lambda): log a_t = r_t * this
std::vector<float> log_a_scale(const at::Tensor& a_logit) {
  auto lam = a_logit.contiguous();
  const float* p = lam.data_ptr<float>();
  std::vector<float> out(lam.numel());
  for (int64_t d = 0; d < lam.numel(); ++d) {
    float x = -p[d];
    float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
    out[d] = -kC * softplus;
  }
  return out;
}

// Runs fn(b, head0, head1) over every batch row and head on torch's intra-op thread pool.
// A work item walks time over whole rows of its batch element (contiguous in memory: measured
// ~2.5x faster than one head per item, whose 1 KB-strided rows defeat the prefetcher); rows are
// cut into head ranges only when there are too few batch elements to keep the threads busy.
// Built with -fopenmp, the library asks for libgomp.so.1, which resolves to the copy torch has
// already loaded: one OpenMP pool, not a second set of threads competing for the cores.
template <typename Fn>
void parallel_items(const Geometry& g, const Fn& fn) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t cuts = g.batch >= 2 * threads ? 1 : std::min(g.heads, 2 * threads);
  at::parallel_for(0, g.batch * cuts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / cuts, c = i % cuts;
      fn(b, g.heads * c / cuts, g.heads * (c + 1) / cuts);
    }
  });
}

at::Tensor rglru_forward(const at::Tensor& u, const at::Tensor& gates, const at::Tensor& a_logit,
                         const at::Tensor& h0, const at::Tensor& reset) {
  const Geometry g = geometry(u, gates);
  check_state(g, a_logit, h0);
  const bool* R = reset_flags(g, reset);
  const std::vector<float> scale = log_a_scale(a_logit);
  const bool has_h0 = h0.numel() > 0;
  at::Tensor h0c = has_h0 ? h0.contiguous() : h0;
  at::Tensor h = at::empty_like(u);
  const float* U = u.data_ptr<float>();
  const float* G = gates.data_ptr<float>();
  const float* H0 = has_h0 ? h0c.data_ptr<float>() : nullptr;
  float* H = h.data_ptr<float>();

  parallel_items(g, [&](int64_t b, int64_t head0, int64_t head1) {
    const int64_t d0 = head0 * g.blk, span = (head1 - head0) * g.blk;
    std::vector<float> state(span, 0.0f);
    if (H0) std::copy(H0 + b * g.width + d0, H0 + b * g.width + d0 + span, state.begin());
    for (int64_t t = 0; t < g.length; ++t) {
      const float keep = R && R[b * g.length + t] ? 0.0f : 1.0f;
      for (int64_t head = head0; head < head1; ++head) {
        const int64_t d = head * g.blk, row = (b * g.length + t) * g.width + d;
        const float* gx = G + b * g.g_batch + t * g.g_time + head * g.g_head;
        forward_step(g.blk, U + row, gx, gx + g.blk, scale.data() + d, keep,
                     state.data() + (d - d0), H + row);
      }
    }
  });
  return h;
}

// Returns (grad_u, grad_gates, grad_a_logit, grad_h0); grad_gates has the strides of gates and
// grad_h0 is meaningful only when h0 was given.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rglru_backward(
    const at::Tensor& grad_h_in, const at::Tensor& u, const at::Tensor& gates,
    const at::Tensor& a_logit, const at::Tensor& h0, const at::Tensor& h,
    const at::Tensor& reset) {
  const Geometry g = geometry(u, gates);
  check_state(g, a_logit, h0);
  const bool* R = reset_flags(g, reset);
  const std::vector<float> scale = log_a_scale(a_logit);
  const bool has_h0 = h0.numel() > 0;
  at::Tensor h0c = has_h0 ? h0.contiguous() : h0;
  at::Tensor grad_h = grad_h_in.contiguous();
  TORCH_CHECK(h.is_contiguous() && grad_h.sizes() == u.sizes(), "rglru: bad saved state");
  at::Tensor grad_u = at::empty_like(u);
  at::Tensor grad_gates = at::empty_strided(gates.sizes(), gates.strides(), gates.options());
  at::Tensor grad_scale = at::empty({g.batch, g.width}, u.options());  // per batch row
  at::Tensor grad_h0 = at::empty({g.batch, g.width}, u.options());
  TORCH_CHECK(grad_gates.strides() == gates.strides(), "rglru: gates must not overlap");

  const float* U = u.data_ptr<float>();
  const float* G = gates.data_ptr<float>();
  const float* H = h.data_ptr<float>();
  const float* GH = grad_h.data_ptr<float>();
  const float* H0 = has_h0 ? h0c.data_ptr<float>() : nullptr;
  float* GU = grad_u.data_ptr<float>();
  float* GG = grad_gates.data_ptr<float>();
  float* GS = grad_scale.data_ptr<float>();
  float* GH0 = grad_h0.data_ptr<float>();

  parallel_items(g, [&](int64_t b, int64_t head0, int64_t head1) {
    const int64_t d0 = head0 * g.blk, span = (head1 - head0) * g.blk;
    std::vector<float> carry(span, 0.0f), acc(span, 0.0f), zeros(span, 0.0f);
    const float* first_prev = H0 ? H0 + b * g.width + d0 : zeros.data();
    for (int64_t t = g.length - 1; t >= 0; --t) {
      const float keep = R && R[b * g.length + t] ? 0.0f : 1.0f;
      for (int64_t head = head0; head < head1; ++head) {
        const int64_t d = head * g.blk, k = d - d0, row = (b * g.length + t) * g.width + d;
        const int64_t goff = b * g.g_batch + t * g.g_time + head * g.g_head;
        backward_step(g.blk, U + row, G + goff, G + goff + g.blk, scale.data() + d, keep,
                      GH + row, t > 0 ? H + row - g.width : first_prev + k, carry.data() + k,
                      acc.data() + k, GU + row, GG + goff, GG + goff + g.blk);
      }
    }
    std::copy(acc.begin(), acc.end(), GS + b * g.width + d0);
    std::copy(carry.begin(), carry.end(), GH0 + b * g.width + d0);
  });
  // log a = r * (-c softplus(-Lambda)); d/dLambda of -c softplus(-Lambda) = c sigmoid(-Lambda)
  at::Tensor grad_a_logit = grad_scale.sum(0) * at::sigmoid(-a_logit.to(at::kFloat)) * kC;
  return {grad_u, grad_gates, grad_a_logit, grad_h0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chimera, m) {
  m.def("rglru_forward(Tensor u, Tensor gates, Tensor a_logit, Tensor h0, Tensor reset) "
        "-> Tensor");
  m.def("rglru_backward(Tensor grad_h, Tensor u, Tensor gates, Tensor a_logit, Tensor h0, "
        "Tensor h, Tensor reset) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("rglru_forward", &rglru_forward);
  m.impl("rglru_backward", &rglru_backward);
}
