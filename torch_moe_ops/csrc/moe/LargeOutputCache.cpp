#include <moe/LargeOutputCache.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace torch_moe_ops {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kDefaultLimitBytes = 2048 * kMiB;
constexpr int64_t kDefaultMinBlockBytes = 32 * kMiB;  // glibc's largest mmap threshold

int64_t limit_from_env() {
  const char* env = std::getenv("TORCH_MOE_OPS_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') {
    return kDefaultLimitBytes;
  }
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mib >= 0 && mib <= (int64_t{1} << 40),
      "TORCH_MOE_OPS_CPU_CACHE_MB must be a whole number of MiB in [0, 2**40], got '", env, "'");
  return static_cast<int64_t>(mib) * kMiB;
}

// The context of a cached DataPtr: its block, and where to return it.
struct Block {
  void* ptr;
  size_t bytes;
};

class LargeOutputCache final : public c10::Allocator {
 public:
  LargeOutputCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    bool cacheable = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cacheable = limit_ > 0 && static_cast<int64_t>(n) >= min_block_;
      // The most recently released block of this size: its pages are the
      // likeliest to be resident and in the TLB.
      for (auto it = free_.rbegin(); cacheable && it != free_.rend(); ++it) {
        if (it->bytes == n) {
          const Block block = *it;
          free_.erase(std::next(it).base());
          cached_bytes_ -= static_cast<int64_t>(n);
          ++hits_;
          return hand_out(block);
        }
      }
      misses_ += cacheable ? 1 : 0;
    }
    if (!cacheable) {
      return c10::GetCPUAllocator()->allocate(n);
    }
    void* ptr = nullptr;
    try {
      ptr = c10::alloc_cpu(n);
    } catch (const c10::Error&) {
      // The held blocks may be what the allocation lacks.
      empty();
      ptr = c10::alloc_cpu(n);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    return hand_out(Block{ptr, n});
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release(Block block) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto bytes = static_cast<int64_t>(block.bytes);
      in_use_bytes_ -= bytes;
      if (bytes > limit_) {
        to_free.push_back(block.ptr);
      } else {
        free_.push_back(block);
        cached_bytes_ += bytes;
        evict_to(limit_, to_free);
      }
      report(block.ptr, -bytes);
    }
    free_blocks(to_free);
  }

  LargeOutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, in_use_bytes_, cached_bytes_, static_cast<int64_t>(free_.size()), limit_, min_block_};
  }

  void configure(int64_t limit, int64_t min_block) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      min_block_ = min_block;
      evict_to(limit_, to_free);
    }
    free_blocks(to_free);
  }

  void fill_held(uint8_t byte) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Block& block : free_) {
      std::memset(block.ptr, byte, block.bytes);
    }
  }

  void empty() {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_to(0, to_free);
    }
    free_blocks(to_free);
  }

 private:
  static void delete_block(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    const Block copy = *block;
    delete block;
    static_cast<LargeOutputCache*>(large_output_cache())->release(copy);
  }

  // Needs mutex_.
  c10::DataPtr hand_out(Block block) {
    in_use_bytes_ += static_cast<int64_t>(block.bytes);
    report(block.ptr, static_cast<int64_t>(block.bytes));
    return {block.ptr, new Block(block), &delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  // torch.profiler's memory events, as c10's CPU allocator records its own:
  // in use and reserved (in use + held). Needs mutex_.
  void report(void* ptr, int64_t delta) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use_bytes_),
                                       static_cast<size_t>(in_use_bytes_ + cached_bytes_),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  // Outside mutex_: unmapping takes time.
  static void free_blocks(const std::vector<void*>& blocks) {
    for (void* p : blocks) {
      c10::free_cpu(p);
    }
  }

  // Drops the oldest held blocks until at most `bytes` are held (into
  // to_free, for free_blocks). Needs mutex_.
  void evict_to(int64_t bytes, std::vector<void*>& to_free) {
    while (cached_bytes_ > bytes && !free_.empty()) {
      cached_bytes_ -= static_cast<int64_t>(free_.front().bytes);
      to_free.push_back(free_.front().ptr);
      free_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Block> free_;  // held blocks, oldest released first
  int64_t in_use_bytes_ = 0;  // handed out by the cache and not released yet
  int64_t cached_bytes_ = 0;
  int64_t limit_;
  int64_t min_block_ = kDefaultMinBlockBytes;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

LargeOutputCache& cache() {
  // Never destroyed: tensors may be freed after static destructors ran.
  static auto* instance = new LargeOutputCache();
  return *instance;
}

} // namespace

c10::Allocator* large_output_cache() {
  return &cache();
}

LargeOutputCacheStats large_output_cache_stats() {
  return cache().stats();
}

void large_output_cache_empty() {
  cache().empty();
}

void large_output_cache_fill_held(uint8_t byte) {
  cache().fill_held(byte);
}

void large_output_cache_configure(int64_t limit_bytes, int64_t min_block_bytes) {
  TORCH_CHECK_VALUE(limit_bytes >= 0, "large_output_cache_configure: limit_bytes must be >= 0, got ", limit_bytes);
  TORCH_CHECK_VALUE(min_block_bytes >= 1, "large_output_cache_configure: min_block_bytes must be >= 1, got ",
      min_block_bytes);
  cache().configure(limit_bytes, min_block_bytes);
}

at::Tensor empty_cached(c10::IntArrayRef size, c10::ScalarType dtype) {
  return at::detail::empty_generic(size, large_output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

at::Tensor empty_strided_cached(c10::IntArrayRef size, c10::IntArrayRef stride, c10::ScalarType dtype) {
  return at::detail::empty_strided_generic(size, stride, large_output_cache(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

} // namespace torch_moe_ops
