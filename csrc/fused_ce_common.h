// What the CPU and CUDA fused cross-entropy share: the argument checks and the tile matmul
// (ATen only, so both builds include it).
#pragma once

#include <ATen/ATen.h>

namespace mext {

inline void check_ce_args(const at::Tensor& hidden, const at::Tensor& weight,
                          const at::Tensor& target, int64_t block_rows, int64_t chunk_cols) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [n, h] and weight [v, h] must share h; got hidden ", hidden.sizes(),
              " and weight ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
              "hidden and weight must share a dtype; got ", hidden.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == hidden.size(0),
              "target must be int64 [", hidden.size(0), "]; got ", target.scalar_type(), " ",
              target.sizes());
  TORCH_CHECK(block_rows > 0 && chunk_cols > 0,
              "block_rows and chunk_cols must be positive; got ", block_rows, " and ",
              chunk_cols);
}

// [rows, cols] view on the front of a flat tile buffer, filled with hb @ wc^T (no allocation
// per tile).
inline at::Tensor tile_logits(at::Tensor& buf, const at::Tensor& hb, const at::Tensor& wc) {
  auto out = buf.narrow(0, 0, hb.size(0) * wc.size(0)).view({hb.size(0), wc.size(0)});
  return at::mm_out(out, hb, wc.t());
}

}  // namespace mext
