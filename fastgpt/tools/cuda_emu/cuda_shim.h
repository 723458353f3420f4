// CUDA execution model on the host: force-included (g++ -include cuda_shim.h) before an unmodified
// csrc/*.cu file, so that its kernels and launchers compile as C++ and run on the CPU.
//
// The mapping (implemented in emu_runtime.cpp):
//  * a kernel launch runs the grid's blocks one after another; each block runs one fiber (a
//    cooperative user-space thread with its own stack) per CUDA thread, on the calling OS thread;
//  * threadIdx / blockIdx / blockDim / gridDim read the running fiber's coordinates;
//  * __syncthreads() is a block barrier and __syncwarp / the __shfl_*_sync intrinsics a warp
//    barrier: the fiber yields to the scheduler, which resumes it once every thread that must
//    arrive has arrived. A shuffle publishes the lane's value, waits at the warp barrier and reads
//    its source lane with PTX's shfl.sync lane arithmetic (width, clamping, out-of-range lanes);
//  * static shared memory (FASTGPT_SHARED in csrc/common.cuh) lives in a per-block arena that is
//    poisoned (all bits set: NaN for floats) when each block starts;
//  * the scheduler resumes runnable fibers in a fixed order (forward, reverse or seeded shuffle),
//    so a read of shared data that another thread writes without a barrier in between sees the
//    poison or a stale value deterministically, rather than racing;
//  * misuse is an error, not undefined behaviour: a deadlock (a barrier in divergent code, a
//    shuffle whose mask names an exited or missing lane, lanes passing different masks), a block
//    of more than 1024 threads, a grid dimension out of range, too much shared memory.
// The CUDA runtime calls made by the launchers are renamed to emulator functions (cudaGetDevice,
// cudaDeviceGetAttribute, cudaGetLastError), so nothing here binds to the real libcudart.
#pragma once

#define FASTGPT_EMULATOR 1

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords -------------------------------------------------------------------------------

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// Direct __shared__ declarations would be plain statics, shared by every launch and never
// poisoned: the kernels declare shared memory with FASTGPT_SHARED instead, and this makes a
// direct use a compile error in the emulator build.
#define __shared__ fastgpt_emulator_use_FASTGPT_SHARED_to_declare_shared_memory

#define FASTGPT_API extern "C" __attribute__((visibility("default")))

namespace emu {

struct Coords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running fiber's coordinates (launches are serialised: one emulated grid at a time).
extern Coords* g_coords;

// Which planted bug is switched on (0: none); see FASTGPT_EMU_BUG.
extern int g_planted_bug;

void syncthreads();
void syncwarp(unsigned mask);

enum ShflMode { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflBfly = 3 };
uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, int b, int width);

template <typename T>
inline T shfl(ShflMode mode, unsigned mask, T var, int b, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_bits(mode, mask, bits, b, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Per-block storage for the shared array declared at `tag` (one tag per declaration and template
// instantiation): every thread of the block gets the same pointer.
void* shared_array(const void* tag, size_t bytes, size_t align);

using Entry = void (*)(void*);
void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, Entry entry, void* ctx);

template <auto K>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}

// FASTGPT_LAUNCH(grid, block, smem, stream, kernel)(args...)
template <typename... P>
struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);

  Launch(const char* n, dim3 g, dim3 b, size_t s, cudaStream_t, void (*k)(P...)) : name(n), grid(g), block(b), smem(s), kernel(k) {}

  template <typename... A>
  void operator()(A&&... args) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch(
        name, grid, block, smem, [](void* c) { auto* x = static_cast<Ctx*>(c); std::apply(x->kernel, x->args); }, &ctx);
  }
};

// cudaGetDevice / cudaDeviceGetAttribute / cudaGetLastError of the emulated device.
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t get_last_error();

}  // namespace emu

#define threadIdx (::emu::g_coords->thread_idx)
#define blockIdx (::emu::g_coords->block_idx)
#define blockDim (::emu::g_coords->block_dim)
#define gridDim (::emu::g_coords->grid_dim)

#define FASTGPT_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::Launch(::emu::kernel_name<__VA_ARGS__>(), (grid), (block), (smem), (stream), __VA_ARGS__)

#define FASTGPT_SHARED(type, name, count)                                                     \
  static const char name##_emu_tag = 0;                                                       \
  type* const name = static_cast<type*>(::emu::shared_array(&name##_emu_tag, sizeof(type) * (count), alignof(type)))

// Mutation tests edit a kernel source into `FASTGPT_EMU_BUG(k) ? <bug> : <original>`: one build
// holds every planted bug, switched on one at a time at run time (fastgpt_emu_plant_bug).
#define FASTGPT_EMU_BUG(k) (::emu::g_planted_bug == (k))

#define cudaGetDevice ::emu::get_device
#define cudaDeviceGetAttribute ::emu::device_get_attribute
#define cudaGetLastError ::emu::get_last_error

// ---- intrinsics ----------------------------------------------------------------------------------

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::emu::shfl(::emu::kShflIdx, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::emu::shfl(::emu::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::emu::shfl(::emu::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::emu::shfl(::emu::kShflBfly, mask, var, lane_mask, width);
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
