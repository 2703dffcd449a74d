// The head_dim 192 forward's ALiBi / block-mask kernels (fwd_kernel<Tr, true>), compiled beside
// fwd_hdim192.cu's dense ones (same configuration: that unit, with FMX_FWD_EXTRAS_UNIT).
#define FMX_FWD_EXTRAS_UNIT
#include "fwd_hdim192.cu"
