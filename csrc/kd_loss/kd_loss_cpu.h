// What fastkd._C (module.cpp) exposes of the KD loss's CPU side: the cache of freed CPU gradient
// buffers (kd_loss_cpu.cpp).
#pragma once

#include <cstddef>

namespace fastkd {

// Frees the cached buffers (returns the bytes freed).
size_t empty_cpu_grad_cache();
// Turns the cache on or off (off: new gradients come from torch's allocator; what is cached stays
// until freed). fastkd/_extension.py sets it at import from FASTKD_CPU_GRAD_CACHE.
void set_cpu_grad_cache(bool enabled);
// Bytes held by the cache.
size_t cpu_grad_cache_bytes();

}  // namespace fastkd
