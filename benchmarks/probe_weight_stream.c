// How fast one core reads expert weights from DRAM in the orders grouped mm's
// CPU kernels could read them (benchmarks/README.md, "What bounds the
// bfloat16 misses on DeepSeek-V3"). No GEMM: loads (and, for "rows+pack", the K-pair
// interleave and its stores) only, so the numbers are the memory side's
// ceiling for each order.
//
//   gcc -O2 -mavx512f -mavx512bw -o /tmp/probe_weight_stream benchmarks/probe_weight_stream.c
//   /tmp/probe_weight_stream [processes] [experts]
//
// Weights are `experts` matrices of K x N bfloat16 (K 1792, N 1024: the
// DeepSeek-V3 row of bench_grouped_mm), rows of 2 KB, in 2 MB pages. With
// processes > 1, that many copies run at once (one per core) and each prints
// its own rates.

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { K = 1792, N = 1024, KC = 256, STRIP = 128 /* bytes: 64 bf16 columns */, TILE = 512 /* 256 columns */ };
static const int64_t RS = N * 2;  // bytes per weight row

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static __m512i sink;

// With processes > 1 they start each order together (a spin barrier in
// shared memory), so every rate is measured with all of them streaming.
static int* arrived;
static int processes = 1;
static void barrier(int round) {
  __atomic_add_fetch(arrived, 1, __ATOMIC_SEQ_CST);
  while (__atomic_load_n(arrived, __ATOMIC_SEQ_CST) < processes * round) _mm_pause();
}

static inline void load_piece(const char* p) {
  sink = _mm512_add_epi64(sink, _mm512_loadu_si512(p));
  sink = _mm512_add_epi64(sink, _mm512_loadu_si512(p + 64));
}

// Every row whole, in address order.
static void rows(const char* w, int experts) {
  const char* end = w + (size_t)experts * K * RS;
  for (const char* p = w; p < end; p += 128) load_piece(p);
}

// The broadcast engine's order: per 256-column tile, per K block of 256 rows,
// per 64-column strip, 256 pieces of 128 bytes 2 KB apart; with prefetch, the
// block two ahead pulled into L2 over the block's rows (kPrefetchBlocksAhead).
static void blocks(const char* w, int experts, int prefetch) {
  const int per_tile = (K / KC) * (TILE / STRIP);
  for (int g = 0; g < experts; ++g) {
    for (int t = 0; t < RS / TILE; ++t) {
      const char* tile = w + (size_t)g * K * RS + t * TILE;
      for (int i = 0; i < per_tile; ++i) {
        const char* blk = tile + (size_t)(i / (TILE / STRIP)) * KC * RS + (i % (TILE / STRIP)) * STRIP;
        const int j = i + 2;
        const char* ahead = prefetch && j < per_tile
            ? tile + (size_t)(j / (TILE / STRIP)) * KC * RS + (j % (TILE / STRIP)) * STRIP
            : NULL;
        for (int r = 0; r < KC; ++r) {
          load_piece(blk + r * RS);
          if (ahead) {
            _mm_prefetch(ahead + r * RS, _MM_HINT_T1);
            _mm_prefetch(ahead + r * RS + 64, _MM_HINT_T1);
          }
        }
      }
    }
  }
}

// K chunks of h rows, all the tile's strips per chunk.
static void chunks(const char* w, int experts, int h) {
  for (int g = 0; g < experts; ++g) {
    for (int t = 0; t < RS / TILE; ++t) {
      const char* tile = w + (size_t)g * K * RS + t * TILE;
      for (int k0 = 0; k0 < K; k0 += h) {
        for (int s = 0; s < TILE; s += STRIP) {
          for (int r = k0; r < k0 + h; ++r) load_piece(tile + (size_t)r * RS + s);
        }
      }
    }
  }
}

// Whole rows in address order, two at a time interleaved into K pairs and
// stored into 64-column strips of a 128 KB block (64 rows x N), as a
// packing pass that reads the weights sequentially would.
static void rows_pack(const char* w, int experts, char* block) {
  // Lane 2c takes column c of the first row, lane 2c + 1 column c of the second.
  int16_t idx[2][32];
  for (int c = 0; c < 16; ++c) {
    idx[0][2 * c] = (int16_t)c, idx[0][2 * c + 1] = (int16_t)(32 + c);
    idx[1][2 * c] = (int16_t)(16 + c), idx[1][2 * c + 1] = (int16_t)(48 + c);
  }
  const __m512i lo = _mm512_loadu_si512(idx[0]), hi = _mm512_loadu_si512(idx[1]);
  const int64_t strip_bytes = 32 * 256;  // 32 K pairs x 64 columns x 4 bytes
  for (int g = 0; g < experts; ++g) {
    for (int k0 = 0; k0 < K; k0 += 64) {
      for (int kp = 0; kp < 32; ++kp) {
        const char* r0 = w + ((size_t)g * K + k0 + 2 * kp) * RS;
        for (int j = 0; j < RS; j += 64) {
          const __m512i x0 = _mm512_loadu_si512(r0 + j), x1 = _mm512_loadu_si512(r0 + RS + j);
          char* o = block + (j / STRIP) * strip_bytes + kp * 256 + (j % STRIP) * 2;
          _mm512_store_si512(o, _mm512_permutex2var_epi16(x0, lo, x1));
          _mm512_store_si512(o + 64, _mm512_permutex2var_epi16(x0, hi, x1));
        }
      }
      sink = _mm512_add_epi64(sink, _mm512_load_si512(block));
    }
  }
}

static void run(int experts) {
  const size_t bytes = (size_t)experts * K * RS;
  char* w = aligned_alloc(1 << 21, bytes);
  char* block = aligned_alloc(64, 128 * 1024);
  if (w == NULL || block == NULL) {
    fprintf(stderr, "probe_weight_stream: cannot allocate %zu bytes\n", bytes);
    exit(1);
  }
  madvise(w, bytes, MADV_HUGEPAGE);
  memset(w, 1, bytes);
  memset(block, 0, 128 * 1024);
  const char* names[] = {"rows", "blocks", "blocks+prefetch", "chunks16", "chunks8", "rows+pack"};
  for (int m = 0; m < 6; ++m) {
    double best = 1e30;
    // The weights (64 experts by default: 235 MB) leave every cache between reps.
    for (int rep = 0; rep < 3; ++rep) {
      barrier(m * 3 + rep + 1);
      const double t0 = now();
      switch (m) {
        case 0: rows(w, experts); break;
        case 1: blocks(w, experts, 0); break;
        case 2: blocks(w, experts, 1); break;
        case 3: chunks(w, experts, 16); break;
        case 4: chunks(w, experts, 8); break;
        default: rows_pack(w, experts, block); break;
      }
      const double dt = now() - t0;
      if (dt < best) best = dt;
    }
    printf("pid %d %-16s %6.1f GB/s\n", (int)getpid(), names[m], bytes / best / 1e9);
    fflush(stdout);
  }
  long out[8];
  _mm512_storeu_si512(out, sink);
  if (out[0] == 42) puts("");
  free(block);
  free(w);
}

int main(int argc, char** argv) {
  processes = argc > 1 ? atoi(argv[1]) : 1;
  const int experts = argc > 2 ? atoi(argv[2]) : 64;
  if (processes < 1 || experts < 1) {
    fprintf(stderr, "usage: %s [processes >= 1] [experts >= 1]\n", argv[0]);
    return 2;
  }
  arrived = mmap(NULL, sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (arrived == MAP_FAILED) {
    perror("probe_weight_stream: mmap");
    return 1;
  }
  *arrived = 0;
  for (int p = 1; p < processes; ++p) {
    if (fork() == 0) {
      run(experts);
      return 0;
    }
  }
  run(experts);
  int status = 0, failed = 0;
  while (wait(&status) > 0) failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
  return failed;
}
