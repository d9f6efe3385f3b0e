// Compile probe of the sm90-family backward (issue 15, work in progress): instantiates its
// launcher for bf16, d = 128, causal and not, so that CI's compile check (.ci/run) catches
// template errors while the backward is registered nowhere. Not part of the extension's build.
#include <cutlass/numeric_types.h>

#include "kernels/sm90/flash_bwd_launch.h"

namespace flash_varlen {
namespace sm90 {

template cudaError_t launch_flash_bwd<cutlass::bfloat16_t, 128, false>(const FlashBwdParams&,
                                                                       const Workspace&,
                                                                       cudaStream_t);
template cudaError_t launch_flash_bwd<cutlass::bfloat16_t, 128, true>(const FlashBwdParams&,
                                                                      const Workspace&,
                                                                      cudaStream_t);
template WorkspaceSize bwd_workspace_size<cutlass::bfloat16_t, 128>(const FlashBwdParams&);

}  // namespace sm90
}  // namespace flash_varlen
