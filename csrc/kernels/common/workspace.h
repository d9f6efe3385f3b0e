// Device memory a launcher needs for one call besides the call's inputs and outputs (a float32
// dQ accumulator, semaphores, split-KV partials, ...). Its size depends on tile shapes that only
// the kernel family knows, so each family's launcher states it (a WorkspaceSizer in
// kernel_registry.h) and the bindings allocate it through PyTorch's caching allocator and hand it
// back to the launch; the bindings know no tile shape.
#pragma once

#include <cstdint>

namespace flash_varlen {

struct WorkspaceSize {
    int64_t scratch_bytes = 0;  // left uninitialized
    int64_t zeroed_bytes = 0;   // zero-filled before the launch
};

// Both buffers start on an allocator boundary (at least 256-byte aligned); nullptr when their
// size is 0.
struct Workspace {
    void* scratch = nullptr;
    void* zeroed = nullptr;
};

// The sizer of a launcher that needs no workspace.
template <typename Params>
WorkspaceSize no_workspace(const Params&) {
    return {};
}

}  // namespace flash_varlen
