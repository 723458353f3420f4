// The CUDA emulator's runtime: fibers, the scheduler, barriers, shuffles, shared memory and the
// emulated device. See cuda_shim.h for the mapping; the C functions at the end are what the Python
// side (fastgpt/tools/cuda_emu/__init__.py) calls besides the kernels' own entry points.
#include "cuda_shim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#undef cudaGetDevice
#undef cudaDeviceGetAttribute
#undef cudaGetLastError

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {

Coords* g_coords = nullptr;
int g_planted_bug = 0;

namespace {

// ---- context switching ----------------------------------------------------------------------------
//
// x86-64: a minimal switch that saves the callee-saved registers and the FP control words on the
// old stack and restores them from the new one (no signal-mask system call, unlike swapcontext, so
// a switch costs nanoseconds: the emulator switches at every barrier and shuffle of every thread).
#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void emu_ctx_entry();
asm(R"(
.text
.p2align 4
.type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_ctx_switch,.-emu_ctx_switch
.p2align 4
.type emu_ctx_entry,@function
emu_ctx_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
.size emu_ctx_entry,.-emu_ctx_entry
)");

struct Context {
  void* sp = nullptr;
};

// A fresh context that starts fn(arg) on the stack [base, base + size).
void make_context(Context& c, char* base, size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 64);  // popped by emu_ctx_switch, then `ret`
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  frame[1] = 0;                                   // r15
  frame[2] = 0;                                   // r14
  frame[3] = reinterpret_cast<uint64_t>(fn);      // r13: called by emu_ctx_entry
  frame[4] = reinterpret_cast<uint64_t>(arg);     // r12: its argument
  frame[5] = 0;                                   // rbx
  frame[6] = 0;                                   // rbp
  frame[7] = reinterpret_cast<uint64_t>(&emu_ctx_entry);
  c.sp = frame;
}

inline void switch_context(Context& from, Context& to) { emu_ctx_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* base, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  // makecontext passes int arguments: split the pointer
  const auto p = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(fn), 2, static_cast<unsigned>(p >> 32), static_cast<unsigned>(p));
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr int kMaxThreads = 1024;

// Fiber stacks with a guard page below each, reused by every launch.
struct StackPool {
  std::vector<char*> stacks;
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));

  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) {
        std::fprintf(stderr, "cuda emulator: cannot map a fiber stack\n");
        std::abort();
      }
      mprotect(m, page, PROT_NONE);
      stacks.push_back(static_cast<char*>(m) + page);
    }
    return stacks[i];
  }
};

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  Coords coords;
  Context ctx;
  Wait wait = Wait::kNone;
  int lane = 0;
  int warp = 0;
  int parity = 0;  // which of the warp's two shuffle slot sets this lane publishes to next
};

struct Warp {
  unsigned live = 0;      // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;
  unsigned arrived = 0;   // lanes waiting at the current warp barrier
  unsigned expected = 0;  // the mask they passed
  uint64_t slots[2][32];
};

struct Device {
  int sms = 1;
  int threads_per_sm = 1024;
  int order = 0;        // rank of the threads: 0 forward, 1 reverse, 2 seeded shuffle (also the order of blocks)
  bool greedy = false;  // false: round robin (every runnable thread advances one step per pass);
                        // true: always resume the first runnable thread in rank order, so it runs as
                        // far ahead of the others as the barriers allow
  uint64_t seed = 0;
};

struct Run {
  const char* kernel = "";
  Entry entry = nullptr;
  void* ctx = nullptr;
  dim3 grid, block;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<int> order;           // rank -> thread
  std::vector<int> rank;            // thread -> rank
  std::vector<uint64_t> runnable;   // bit per rank: the thread can be resumed
  int alive = 0;
  int at_block_barrier = 0;
  std::unordered_map<const void*, size_t> shared_offsets;
  alignas(16) unsigned char arena[kStaticSharedLimit];
  size_t arena_used = 0;
  Context scheduler;
  bool failed = false;
};

std::mutex g_launch_mutex;
StackPool g_stacks;
Device g_device;
Run* g_run = nullptr;
Thread* g_thread = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_error_message;
std::vector<std::string> g_launch_log;
bool g_dry_run = false;
Device g_saved_device;

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// "const char* emu::kernel_name() [with auto K = fastgpt::{anonymous}::kern<float, 4>]" -> "kern<float, 4>"
std::string short_name(const char* pretty) {
  std::string s(pretty);
  const size_t k = s.find("K = ");
  if (k != std::string::npos) s = s.substr(k + 4, s.size() - k - 5);
  for (const char* prefix : {"fastgpt::{anonymous}::", "fastgpt::(anonymous namespace)::", "fastgpt::"}) {
    if (s.rfind(prefix, 0) == 0) s = s.substr(std::strlen(prefix));
  }
  return s;
}

std::string where() {
  if (g_thread == nullptr) return g_run != nullptr ? short_name(g_run->kernel) : std::string();
  const Coords& c = g_thread->coords;
  return format("%s, block (%u,%u,%u), thread (%u,%u,%u)", short_name(g_run->kernel).c_str(), c.block_idx.x, c.block_idx.y, c.block_idx.z,
                c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
}

void record_error(cudaError_t code, const std::string& message) {
  if (g_last_error == cudaSuccess) {
    g_last_error = code;
    g_error_message = message;
  }
}

void set_wait(Run& r, Thread& t, Wait w) {
  t.wait = w;
  const int k = r.rank[&t - r.threads.data()];
  if (w == Wait::kNone) {
    r.runnable[k / 64] |= uint64_t(1) << (k % 64);
  } else {
    r.runnable[k / 64] &= ~(uint64_t(1) << (k % 64));
  }
}

// The first runnable rank, or -1.
int first_runnable(const Run& r) {
  for (size_t i = 0; i < r.runnable.size(); ++i) {
    if (r.runnable[i]) return static_cast<int>(i * 64 + __builtin_ctzll(r.runnable[i]));
  }
  return -1;
}

void yield() {
  Thread* t = g_thread;
  switch_context(t->ctx, g_run->scheduler);
}

// An error inside a kernel: recorded, the launch is abandoned (the fiber never resumes).
[[noreturn]] void fail(const std::string& what) {
  record_error(cudaErrorLaunchFailure, "cuda emulator: " + what + " (" + where() + ")");
  g_run->failed = true;
  set_wait(*g_run, *g_thread, Wait::kDone);
  yield();
  std::abort();  // unreachable: a failed launch never resumes its fibers
}

void release_block_barrier_if_complete(Run& r) {
  if (r.at_block_barrier == 0 || r.at_block_barrier < r.alive) return;
  for (Thread& t : r.threads) {
    if (t.wait == Wait::kBlock) set_wait(r, t, Wait::kNone);
  }
  r.at_block_barrier = 0;
}

void warp_barrier(unsigned mask, const char* what) {
  Run& r = *g_run;
  Thread& t = *g_thread;
  Warp& w = r.warps[t.warp];
  if (((mask >> t.lane) & 1u) == 0) fail(format("%s: the calling lane %d is not in its mask 0x%08x", what, t.lane, mask));
  if (mask & ~w.live) fail(format("%s: mask 0x%08x names lanes that do not exist (live 0x%08x)", what, mask, w.live));
  if (mask & w.exited) fail(format("%s: mask 0x%08x names lanes that have exited (0x%08x)", what, mask, w.exited));
  if (w.arrived == 0) {
    w.expected = mask;
  } else if (mask != w.expected) {
    fail(format("%s: lanes of warp %d passed different masks (0x%08x, 0x%08x)", what, t.warp, w.expected, mask));
  }
  w.arrived |= 1u << t.lane;
  set_wait(r, t, Wait::kWarp);
  if (w.arrived == w.expected) {
    for (int lane = 0; lane < 32; ++lane) {
      if ((w.expected >> lane) & 1u) set_wait(r, r.threads[t.warp * 32 + lane], Wait::kNone);
    }
    w.arrived = 0;
  }
  yield();
}

void fiber_main(void* arg) {
  Thread* t = static_cast<Thread*>(arg);
  Run& r = *g_run;
  r.entry(r.ctx);
  // the thread exits: later barriers wait for the remaining threads only
  Warp& w = r.warps[t->warp];
  if (w.arrived != 0 && ((w.expected >> t->lane) & 1u)) {
    fail(format("lane %d exited while lanes 0x%08x of its warp wait for it at a shuffle or __syncwarp", t->lane, w.arrived));
  }
  set_wait(r, *t, Wait::kDone);
  --r.alive;
  w.exited |= 1u << t->lane;
  release_block_barrier_if_complete(r);
  yield();
  std::abort();  // unreachable: a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_main_split(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

std::string describe_deadlock(const Run& r) {
  int at_block = 0, at_warp = 0, done = 0;
  for (const Thread& t : r.threads) {
    at_block += t.wait == Wait::kBlock;
    at_warp += t.wait == Wait::kWarp;
    done += t.wait == Wait::kDone;
  }
  return format("deadlock: %d threads wait at __syncthreads, %d at a warp barrier (shuffle or __syncwarp), %d have exited; "
                "a barrier in divergent code or a shuffle mask naming a lane that never arrives",
                at_block, at_warp, done);
}

void run_block(Run& r, uint3 bidx) {
  const int n = static_cast<int>(r.block.x * r.block.y * r.block.z);
  std::memset(r.arena, 0xff, sizeof r.arena);  // poison: NaN as float, -1 as int
  r.shared_offsets.clear();
  r.arena_used = 0;
  r.alive = n;
  r.at_block_barrier = 0;
  for (int w = 0; w < static_cast<int>(r.warps.size()); ++w) {
    Warp& wp = r.warps[w];
    const int lanes = std::min(32, n - w * 32);
    wp.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    wp.exited = wp.arrived = wp.expected = 0;
    std::memset(wp.slots, 0xff, sizeof wp.slots);
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.coords.thread_idx = make_uint3(i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y));
    t.coords.block_idx = bidx;
    t.coords.block_dim = r.block;
    t.coords.grid_dim = r.grid;
    set_wait(r, t, Wait::kNone);
    t.lane = i % 32;
    t.warp = i / 32;
    t.parity = 0;
#if defined(__x86_64__)
    make_context(t.ctx, g_stacks.get(i), kStackBytes, &fiber_main, &t);
#else
    make_context(t.ctx, g_stacks.get(i), kStackBytes, reinterpret_cast<void (*)(void*)>(&fiber_main_split), &t);
#endif
  }
  const auto resume = [&r](Thread& t) {
    g_thread = &t;
    g_coords = &t.coords;
    switch_context(r.scheduler, t.ctx);
    g_thread = nullptr;
  };
  while (r.alive > 0) {
    bool progressed = false;
    if (g_device.greedy) {
      const int k = first_runnable(r);
      if (k >= 0) {
        resume(r.threads[r.order[k]]);
        progressed = true;
      }
    } else {
      for (int i : r.order) {
        Thread& t = r.threads[i];
        if (t.wait != Wait::kNone) continue;
        resume(t);
        progressed = true;
        if (r.failed) return;
      }
    }
    if (r.failed) return;
    if (r.alive > 0 && !progressed) {
      record_error(cudaErrorLaunchFailure, "cuda emulator: " + describe_deadlock(r) + " (" + short_name(r.kernel) + ")");
      r.failed = true;
      return;
    }
  }
}

bool valid_launch(const Run& r, size_t dynamic_smem) {
  const dim3& b = r.block;
  const dim3& g = r.grid;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  std::string why;
  if (threads == 0 || threads > kMaxThreads || b.x > 1024 || b.y > 1024 || b.z > 64) {
    why = format("block (%u,%u,%u) is not a valid block (at most 1024 threads; x, y <= 1024, z <= 64)", b.x, b.y, b.z);
  } else if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    why = format("grid (%u,%u,%u) is out of range (x < 2^31, y and z <= 65535)", g.x, g.y, g.z);
  } else if (dynamic_smem != 0) {
    why = "dynamic shared memory is not emulated";
  }
  if (why.empty()) return true;
  record_error(cudaErrorInvalidConfiguration, "cuda emulator: " + why + " (" + short_name(r.kernel) + ")");
  return false;
}

}  // namespace

void syncthreads() {
  Run& r = *g_run;
  set_wait(r, *g_thread, Wait::kBlock);
  ++r.at_block_barrier;
  release_block_barrier_if_complete(r);
  yield();
}

void syncwarp(unsigned mask) { warp_barrier(mask, "__syncwarp"); }

uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, int b, int width) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  Thread& t = *g_thread;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail(format("%s: width %d is not a power of two <= 32", names[mode], width));
  Warp& w = g_run->warps[t.warp];
  const int parity = t.parity;
  t.parity ^= 1;
  w.slots[parity][t.lane] = bits;
  warp_barrier(mask, names[mode]);
  // PTX shfl.sync: c = ((32 - width) << 8) | clamp, with clamp 0 for .up and 31 otherwise
  const int segmask = (32 - width) & 31;
  const int cval = mode == kShflUp ? 0 : 31;
  const int lane = t.lane;
  const int min_lane = lane & segmask;
  const int max_lane = min_lane | (cval & ~segmask);
  int j = lane;
  bool ok = false;
  switch (mode) {
    case kShflUp: j = lane - b; ok = j >= max_lane; break;
    case kShflDown: j = lane + b; ok = j <= max_lane; break;
    case kShflBfly: j = lane ^ b; ok = j <= max_lane; break;
    case kShflIdx: j = min_lane | (b & 31 & ~segmask); ok = j <= max_lane; break;
  }
  if (!ok) j = lane;
  if (((mask >> j) & 1u) == 0) fail(format("%s: lane %d reads lane %d, which is not in the mask 0x%08x", names[mode], lane, j, mask));
  // Two slot sets used alternately: a lane can publish into a set again only after the barrier of
  // the shuffle in between, which every lane reaches after reading this one.
  return w.slots[parity][j];
}

void* shared_array(const void* tag, size_t bytes, size_t align) {
  Run& r = *g_run;
  auto it = r.shared_offsets.find(tag);
  if (it == r.shared_offsets.end()) {
    if (align < 16) align = 16;
    const size_t off = (r.arena_used + align - 1) / align * align;
    if (off + bytes > kStaticSharedLimit) fail(format("static shared memory exceeds %zu bytes", kStaticSharedLimit));
    r.arena_used = off + bytes;
    it = r.shared_offsets.emplace(tag, off).first;
  }
  return r.arena + it->second;
}

void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem, Entry entry, void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  static Run run;  // large (the shared arena): one, reused
  Run& r = run;
  r.kernel = kernel;
  r.entry = entry;
  r.ctx = ctx;
  r.grid = grid;
  r.block = block;
  r.failed = false;
  if (g_launch_log.size() < 100000)
    g_launch_log.push_back(format("%s grid=(%u,%u,%u) block=(%u,%u,%u)", short_name(kernel).c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z));
  if (g_last_error != cudaSuccess) return;  // a sticky error: later launches of the call do not run
  if (!valid_launch(r, dynamic_smem)) return;
  if (g_dry_run) return;  // logged and checked; no thread runs (the pointers may be fake)
  const int n = static_cast<int>(block.x * block.y * block.z);
  r.threads.assign(n, Thread{});
  r.warps.assign((n + 31) / 32, Warp{});
  r.order.resize(n);
  for (int i = 0; i < n; ++i) r.order[i] = i;
  r.rank.resize(n);
  r.runnable.assign((n + 63) / 64, 0);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
  std::mt19937_64 rng(g_device.seed);
  if (g_device.order == 1) {
    std::reverse(r.order.begin(), r.order.end());
    std::reverse(blocks.begin(), blocks.end());
  } else if (g_device.order == 2) {
    std::shuffle(r.order.begin(), r.order.end(), rng);
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  for (int k = 0; k < n; ++k) r.rank[r.order[k]] = k;
  Run* saved_run = g_run;
  g_run = &r;
  for (const uint3& b : blocks) {
    run_block(r, b);
    if (r.failed) break;
  }
  g_run = saved_run;
  g_thread = nullptr;
  g_coords = nullptr;
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_device.sms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = g_device.threads_per_sm; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreads; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;  // like CUDA: reading the error resets it (the message stays readable)
  return e;
}

}  // namespace emu

// ---- the emulator's own C interface (ctypes) ----------------------------------------------------------

// The emulated device: SM count and resident threads per SM (they size the grids of grid-stride
// kernels: small values make every kernel loop), and the fiber schedule: the rank order of threads
// (0 forward, 1 reverse, 2 shuffled with `seed`) and the policy (round robin, or greedy).
EMU_EXPORT void fastgpt_emu_configure(int sms, int threads_per_sm, int order, int greedy, uint64_t seed) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  emu::g_device.sms = sms;
  emu::g_device.threads_per_sm = threads_per_sm;
  emu::g_device.order = order;
  emu::g_device.greedy = greedy != 0;
  emu::g_device.seed = seed;
}

// Switches planted bug `k` on (0: off); only a build with mutated sources has any.
EMU_EXPORT void fastgpt_emu_plant_bug(int k) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  emu::g_planted_bug = k;
}

// The message of the last failed launch ("" if none), and clears it.
EMU_EXPORT const char* fastgpt_emu_take_error() {
  static std::string message;
  message.swap(emu::g_error_message);
  emu::g_error_message.clear();
  emu::g_last_error = cudaSuccess;
  return message.c_str();
}

// Dry run (for the static kernel report): until fastgpt_emu_end_dry_run, launches are logged and
// checked (block and grid sizes) but run no thread, so the entry points can be called with fake,
// never dereferenced pointers; the launchers see a device of `sms` SMs with `threads_per_sm`
// resident threads each (e.g. an H100's 132 and 2048). The end restores the configured device.
EMU_EXPORT void fastgpt_emu_begin_dry_run(int sms, int threads_per_sm) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  if (!emu::g_dry_run) emu::g_saved_device = emu::g_device;
  emu::g_dry_run = true;
  emu::g_device.sms = sms;
  emu::g_device.threads_per_sm = threads_per_sm;
}

EMU_EXPORT void fastgpt_emu_end_dry_run() {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  if (emu::g_dry_run) emu::g_device = emu::g_saved_device;
  emu::g_dry_run = false;
}

// The launches since the last call, one line each ("kernel grid=(...) block=(...)"), newline-separated.
EMU_EXPORT const char* fastgpt_emu_take_launch_log() {
  static std::string text;
  text.clear();
  for (const std::string& line : emu::g_launch_log) text += line + "\n";
  emu::g_launch_log.clear();
  return text.c_str();
}
