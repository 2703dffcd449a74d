// The head_dim 96 forward's ALiBi / block-mask kernels (fwd_kernel<Tr, true>), compiled beside
// fwd_hdim96.cu's dense ones (same configuration: that unit, with FMX_FWD_EXTRAS_UNIT).
#define FMX_FWD_EXTRAS_UNIT
#include "fwd_hdim96.cu"
