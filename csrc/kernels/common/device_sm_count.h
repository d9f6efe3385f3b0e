// The SM count of the current device, for launchers that size their grid by it (the sm90
// forward's persistent grid, the decode family's split heuristic): an attribute query, no sync.
#pragma once

#include <cuda_runtime_api.h>

namespace flash_varlen {

inline int device_sm_count() {
    int device = 0;
    int sm_count = 1;
    if (cudaGetDevice(&device) == cudaSuccess) {
        cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
    }
    return sm_count;
}

}  // namespace flash_varlen
