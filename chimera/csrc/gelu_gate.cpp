// The recurrent block's output gating y = h * gelu_tanh(gate), forward in one pass and backward
// in one pass. Eagerly it is gelu, mul, and in the backward two muls and gelu_backward: five
// passes over (B, T, width) fp32 tensors and two temporaries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x s with s = (1 + tanh z) / 2 = sigmoid(2z), and
// 1 - s = e s with e = exp(-2z): neither 1 + tanh nor 1 - s is formed by cancellation. z is
// clamped so exp stays finite (the file is built with -ffast-math).
inline float exp_minus_2z(float x) {
  float z = kSqrt2OverPi * (x + kCubic * x * x * x);
  return std::exp(-2.0f * std::min(std::max(z, -40.0f), 40.0f));
}

void check(const at::Tensor& h, const at::Tensor& gate) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && gate.scalar_type() == at::kFloat &&
              h.is_contiguous() && gate.is_contiguous() && h.sizes() == gate.sizes(),
              "gelu_gate: h and gate must be contiguous float32 tensors of one shape");
}

inline void forward_span(int64_t n, const float* __restrict__ h, const float* __restrict__ g,
                         float* __restrict__ y) {
  for (int64_t j = 0; j < n; ++j) {
    const float x = g[j];
    y[j] = h[j] * x / (1.0f + exp_minus_2z(x));
  }
}

inline void backward_span(int64_t n, const float* __restrict__ gy, const float* __restrict__ h,
                          const float* __restrict__ g, float* __restrict__ grad_h,
                          float* __restrict__ grad_gate) {
  for (int64_t j = 0; j < n; ++j) {
    const float x = g[j];
    const float e = exp_minus_2z(x);
    const float s = 1.0f / (1.0f + e);
    // d/dx [x s] = s + x ds/dz dz/dx, with ds/dz = 2 s (1 - s) = 2 e s^2
    const float dgelu =
        s + 2.0f * x * e * s * s * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
    grad_h[j] = gy[j] * x * s;
    grad_gate[j] = gy[j] * h[j] * dgelu;
  }
}

constexpr int64_t kGrain = 1 << 14;

at::Tensor gelu_gate_forward(const at::Tensor& h, const at::Tensor& gate) {
  check(h, gate);
  at::Tensor y = at::empty_like(h);
  const float* H = h.data_ptr<float>();
  const float* G = gate.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
    forward_span(end - begin, H + begin, G + begin, Y + begin);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gelu_gate_backward(const at::Tensor& grad_y_in,
                                                      const at::Tensor& h,
                                                      const at::Tensor& gate) {
  check(h, gate);
  at::Tensor grad_y = grad_y_in.contiguous();
  TORCH_CHECK(grad_y.sizes() == h.sizes(), "gelu_gate: gradient shape does not match");
  at::Tensor grad_h = at::empty_like(h), grad_gate = at::empty_like(gate);
  const float* GY = grad_y.data_ptr<float>();
  const float* H = h.data_ptr<float>();
  const float* G = gate.data_ptr<float>();
  float* GH = grad_h.data_ptr<float>();
  float* GG = grad_gate.data_ptr<float>();
  at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
    backward_span(end - begin, GY + begin, H + begin, G + begin, GH + begin, GG + begin);
  });
  return {grad_h, grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chimera, m) {
  m.def("gelu_gate_forward(Tensor h, Tensor gate) -> Tensor");
  m.def("gelu_gate_backward(Tensor grad_y, Tensor h, Tensor gate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("gelu_gate_forward", &gelu_gate_forward);
  m.impl("gelu_gate_backward", &gelu_gate_backward);
}
