// The recurrent block's causal depthwise temporal conv over whole sequences from a zero history,
// out_t = bias + sum_k weight[k] * u_{t-k}, forward and backward each in one pass over time.
// The eager Function in chimera/recurrent.py makes one pass per tap (and per tap again for the
// weight gradient); here the last conv_width input rows stay in cache while they are reused.
// offsets (B, T) int64, or empty: out_t reads u_{t-k} only for k <= offsets[t], the tokens
// since its document's start, so no tap crosses a document boundary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

void check(const at::Tensor& u, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(u.dim() == 3 && u.is_contiguous() && u.scalar_type() == at::kFloat,
              "causal_conv: u must be a contiguous float32 (B, T, W) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == u.size(2) && bias.numel() == u.size(2) &&
              weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "causal_conv: weight must be float32 (K, W) and bias (W,)");
}

// The offsets as a (B * T) array, or nullptr when every tap may reach back to the window start.
const int64_t* document_offsets(const at::Tensor& u, const at::Tensor& offsets) {
  if (offsets.numel() == 0) return nullptr;
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  offsets.dim() == 2 && offsets.size(0) == u.size(0) &&
                  offsets.size(1) == u.size(1),
              "causal_conv: offsets must be empty or a contiguous int64 (B, T) tensor");
  return offsets.data_ptr<int64_t>();
}

// How many taps out_t (at flat row `row`, time t) reads: never before t = 0 or its document.
inline int64_t reach(const int64_t* offsets, int64_t row, int64_t t) {
  return offsets ? std::min(offsets[row], t) + 1 : t + 1;
}

at::Tensor causal_conv_forward(const at::Tensor& u, const at::Tensor& weight_in,
                               const at::Tensor& bias_in, const at::Tensor& offsets_in) {
  check(u, weight_in, bias_in);
  const int64_t* offsets = document_offsets(u, offsets_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t batch = u.size(0), length = u.size(1), width = u.size(2), taps = weight.size(0);
  at::Tensor out = at::empty_like(u);
  const float* U = u.data_ptr<float>();
  const float* Wt = weight.data_ptr<float>();
  const float* Bs = bias.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % length;
      float* __restrict__ o = O + row * width;
      std::copy(Bs, Bs + width, o);
      for (int64_t k = 0; k < std::min(taps, reach(offsets, row, t)); ++k) {
        const float* __restrict__ x = U + (row - k) * width;
        const float* __restrict__ w = Wt + k * width;
        for (int64_t j = 0; j < width; ++j) o[j] += w[j] * x[j];
      }
    }
  });
  return out;
}

// Returns (grad_u, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv_backward(
    const at::Tensor& grad_in, const at::Tensor& u, const at::Tensor& weight_in,
    const at::Tensor& offsets_in) {
  const int64_t* offsets = document_offsets(u, offsets_in);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = u.size(0), length = u.size(1), width = u.size(2), taps = weight.size(0);
  at::Tensor grad_u = at::empty_like(u);
  // Per batch element partial sums of the weight and bias gradients, reduced at the end.
  at::Tensor partial = at::zeros({batch, taps + 1, width}, u.options());
  const float* U = u.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  const float* Wt = weight.data_ptr<float>();
  float* GU = grad_u.data_ptr<float>();
  float* P = partial.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* gw = P + b * (taps + 1) * width;
      float* __restrict__ gb = gw + taps * width;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t row = b * length + t;
        const float* __restrict__ g = G + row * width;
        float* __restrict__ gu = GU + row * width;
        std::fill(gu, gu + width, 0.0f);
        for (int64_t j = 0; j < width; ++j) gb[j] += g[j];
        for (int64_t k = 0; k < taps; ++k) {
          if (t + k < length && k < reach(offsets, row + k, t + k)) {
            // u_t feeds out_{t+k} through weight[k]
            const float* __restrict__ gk = G + (row + k) * width;
            const float* __restrict__ w = Wt + k * width;
            for (int64_t j = 0; j < width; ++j) gu[j] += w[j] * gk[j];
          }
          if (k < reach(offsets, row, t)) {  // out_t reads u_{t-k} through weight[k]
            const float* __restrict__ x = U + (row - k) * width;
            float* __restrict__ acc = gw + k * width;
            for (int64_t j = 0; j < width; ++j) acc[j] += g[j] * x[j];
          }
        }
      }
    }
  });
  at::Tensor sums = partial.sum(0);
  return {grad_u, sums.narrow(0, 0, taps).contiguous(), sums[taps].contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chimera, m) {
  m.def("causal_conv_forward(Tensor u, Tensor weight, Tensor bias, Tensor offsets) -> Tensor");
  m.def("causal_conv_backward(Tensor grad, Tensor u, Tensor weight, Tensor offsets) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("causal_conv_forward", &causal_conv_forward);
  m.impl("causal_conv_backward", &causal_conv_backward);
}
