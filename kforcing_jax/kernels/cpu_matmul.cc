// Two CPU products for decoding, called through XLA's FFI.
//
// KfInt8Matmul, weight-only int8 products: y[m, n] = scale[n] * sum_k x[m, k] * q[k, n],
// float32 activations and accumulation, int8 weights read once per call. XLA:CPU widens
// narrow weights to float32 in full before a product, so a batch-1 decoding step reads 4
// bytes per weight; this kernel reads 1 and widens 16 at a time in registers. Weights come
// panel-packed, [N / 16, K, 16] int8 (kforcing_jax.models.quantize.pack): one panel is 16
// output columns over all of K, contiguous, so a tile streams its panel once while its
// rows' accumulators stay in registers.
//
// KfBatchedMatmul, float32 y[b] = x[b] @ w[b] for many small products with few rows: the
// two products of decode-time attention over the KV cache, per (batch row, KV head), with
// the cache in its stored layout as w. XLA:CPU runs such batched dots far below memory
// speed; here the same tiles stream w's rows (stride N) once per row block.
//
// Work is split into chunks. The calling thread and helpers scheduled on XLA's intra-op
// pool take chunks from one atomic counter, and the caller waits only for chunks that were
// taken: a helper that never starts costs nothing and cannot deadlock the call.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;

// One panel row (16 columns) as registers, per instruction set: Zero, LoadRow (int8
// widened, or float32), Fma(acc, x, w) = acc + x * w, Add, and Store of acc * scale to the
// first `cols` columns.
#if defined(__AVX512F__)
constexpr int kMaxRows = 12;  // accumulators of a row block (32 registers)
using Vec = __m512;

inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec LoadRow(const int8_t* w) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline Vec LoadRow(const float* w) { return _mm512_loadu_ps(w); }
inline Vec Fma(Vec acc, const float* x, Vec w) {
  return _mm512_fmadd_ps(_mm512_set1_ps(*x), w, acc);
}
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void Store(float* y, Vec acc, const float* scale, int64_t cols) {
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  _mm512_mask_storeu_ps(y, mask, _mm512_mul_ps(acc, _mm512_loadu_ps(scale)));
}

#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMaxRows = 6;  // two registers per row (16 registers)
struct Vec {
  __m256 lo, hi;
};

inline Vec Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec LoadRow(const int8_t* w) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline Vec LoadRow(const float* w) { return {_mm256_loadu_ps(w), _mm256_loadu_ps(w + 8)}; }
inline Vec Fma(Vec acc, const float* x, Vec w) {
  const __m256 xi = _mm256_broadcast_ss(x);
  return {_mm256_fmadd_ps(xi, w.lo, acc.lo), _mm256_fmadd_ps(xi, w.hi, acc.hi)};
}
inline Vec Add(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline void Store(float* y, Vec acc, const float* scale, int64_t cols) {
  const __m256 lo = _mm256_mul_ps(acc.lo, _mm256_loadu_ps(scale));
  const __m256 hi = _mm256_mul_ps(acc.hi, _mm256_loadu_ps(scale + 8));
  if (cols == kPanel) {
    _mm256_storeu_ps(y, lo);
    _mm256_storeu_ps(y + 8, hi);
  } else {
    alignas(32) float tmp[kPanel];
    _mm256_store_ps(tmp, lo);
    _mm256_store_ps(tmp + 8, hi);
    std::memcpy(y, tmp, cols * sizeof(float));
  }
}

#else  // portable: the compiler vectorizes what it can
constexpr int kMaxRows = 4;
struct Vec {
  float v[kPanel];
};

inline Vec Zero() { return {}; }
template <typename W>
inline Vec LoadRow(const W* w) {
  Vec r;
  for (int j = 0; j < kPanel; ++j) r.v[j] = static_cast<float>(w[j]);
  return r;
}
inline Vec Fma(Vec acc, const float* x, const Vec& w) {
  for (int j = 0; j < kPanel; ++j) acc.v[j] += *x * w.v[j];
  return acc;
}
inline Vec Add(Vec a, const Vec& b) {
  for (int j = 0; j < kPanel; ++j) a.v[j] += b.v[j];
  return a;
}
inline void Store(float* y, const Vec& acc, const float* scale, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) y[j] = acc.v[j] * scale[j];
}
#endif

// One tile: MB rows of x times one panel (16 columns of w, its rows `ldw` apart), k by k,
// written to the panel's `cols` columns of y. The panel is int8 (packed weights), float32
// widened from them (once, reused by every row block when M exceeds one block), or a
// float32 matrix's columns.
template <int MB, typename W>
void Tile(const float* x, int64_t ldx, int64_t K, const W* w, int64_t ldw, const float* scale,
          float* y, int64_t ldy, int64_t cols) {
  // short row blocks get independent accumulator chains over k (the FMA latency)
  constexpr int U = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  Vec acc[U][MB];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[u][i] = Zero();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const Vec wk = LoadRow(w + (k + u) * ldw);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[u][i] = Fma(acc[u][i], x + i * ldx + k + u, wk);
    }
  }
  for (; k < K; ++k) {
    const Vec wk = LoadRow(w + k * ldw);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[0][i] = Fma(acc[0][i], x + i * ldx + k, wk);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    Vec a = acc[0][i];
    for (int u = 1; u < U; ++u) a = Add(a, acc[u][i]);
    Store(y + i * ldy, a, scale, cols);
  }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, int64_t, const W*, int64_t, const float*, float*,
                        int64_t, int64_t);

template <typename W, int... I>
constexpr auto MakeTiles(std::integer_sequence<int, I...>) {
  return std::array<TileFn<W>, sizeof...(I)>{&Tile<I + 1, W>...};
}
constexpr auto kInt8Tiles = MakeTiles<int8_t>(std::make_integer_sequence<int, kMaxRows>{});
constexpr auto kFloatTiles = MakeTiles<float>(std::make_integer_sequence<int, kMaxRows>{});

// Runs chunk(0..n_chunks-1) on the calling thread and up to threads - 1 helpers from the pool.
class ParallelChunks {
 public:
  static void Run(ffi::ThreadPool& pool, int64_t n_chunks, std::function<void(int64_t)> chunk) {
    auto shared = std::make_shared<ParallelChunks>(n_chunks, std::move(chunk));
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), n_chunks) - 1;
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Work(); });
    shared->Work();
    while (shared->done_.load(std::memory_order_acquire) < n_chunks) std::this_thread::yield();
  }

  ParallelChunks(int64_t n, std::function<void(int64_t)> chunk)
      : n_(n), chunk_(std::move(chunk)) {}

 private:
  void Work() {
    for (int64_t c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) {
      chunk_(c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  const int64_t n_;
  const std::function<void(int64_t)> chunk_;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
};

// Below this many multiply-adds a call runs on its own thread: waking a helper costs more.
constexpr int64_t kParallelMacs = int64_t{1} << 17;

// Runs range(i0, i1) over `items` work items split in chunks: a few per thread even out a
// helper that starts late; one chunk where the call (`macs` multiply-adds) is too small to
// share.
void ParallelRanges(ffi::ThreadPool& pool, int64_t items, int64_t macs,
                    const std::function<void(int64_t, int64_t)>& range) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t want =
      threads == 1 || macs < kParallelMacs || items < 2 ? 1 : std::min(items, 4 * threads);
  const int64_t per_chunk = (items + want - 1) / want;
  ParallelChunks::Run(pool, (items + per_chunk - 1) / per_chunk, [=](int64_t c) {
    range(c * per_chunk, std::min(items, (c + 1) * per_chunk));
  });
}

void Int8Panels(const float* x, const int8_t* w, const float* scale, float* y, int64_t M,
                int64_t K, int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
    const int8_t* panel = w + p * K * kPanel;
    if (M <= kMaxRows) {
      kInt8Tiles[M - 1](x, K, K, panel, kPanel, scale + n0, y + n0, N, cols);
      continue;
    }
    // several row blocks: widen the panel once (K x 16 floats, cache-resident)
    thread_local std::vector<float> wide;
    wide.resize(K * kPanel);
    for (int64_t i = 0; i < K * kPanel; ++i) wide[i] = static_cast<float>(panel[i]);
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, M - m);
      kFloatTiles[rows - 1](x + m * K, K, K, wide.data(), kPanel, scale + n0, y + m * N + n0,
                            N, cols);
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("int8 matmul: want x [M, K], w [P, K, 16], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const int64_t panels = (N + kPanel - 1) / kPanel;
  if (wd[1] != K || yd[0] != M || wd[0] != panels ||
      static_cast<int64_t>(scale.element_count()) != panels * kPanel)
    return ffi::Error::InvalidArgument("int8 matmul: mismatched shapes");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  ParallelRanges(pool, panels, M * K * N, [=](int64_t p0, int64_t p1) {
    Int8Panels(xp, wp, sp, yp, M, K, N, p0, p1);
  });
  return ffi::Error::Success();
}

alignas(64) constexpr float kOnes[kPanel] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// y = x @ w for one product of the batch: x [M, K], w [K, N] row-major, y [M, N]. A last
// partial panel is copied into a zero-padded K x 16 buffer, so no load reads past w.
void FloatProduct(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t cols = std::min(kPanel, N - n0);
    const float* panel = w + n0;
    int64_t ldw = N;
    thread_local std::vector<float> padded;
    if (cols < kPanel) {
      padded.assign(K * kPanel, 0.0f);
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(&padded[k * kPanel], w + k * N + n0, cols * sizeof(float));
      panel = padded.data();
      ldw = kPanel;
    }
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, M - m);
      kFloatTiles[rows - 1](x + m * K, K, K, panel, ldw, kOnes, y + m * N + n0, N, cols);
    }
  }
}

ffi::Error BatchedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  // leading axes are the batch, taken as they come: a reshape of an operand that XLA fuses
  // with the cache's in-place update would cost a copy of the cache per call
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const size_t r = xd.size();
  if (r < 3 || wd.size() != r || yd.size() != r)
    return ffi::Error::InvalidArgument(
        "batched matmul: want x [..., M, K], w [..., K, N], y [..., M, N]");
  int64_t B = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (wd[i] != xd[i] || yd[i] != xd[i])
      return ffi::Error::InvalidArgument("batched matmul: mismatched batch axes");
    B *= xd[i];
  }
  const int64_t M = xd[r - 2], K = xd[r - 1], N = wd[r - 1];
  if (wd[r - 2] != K || yd[r - 2] != M || yd[r - 1] != N)
    return ffi::Error::InvalidArgument("batched matmul: mismatched shapes");
  if (B == 0 || M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (K == 0) {
    std::fill(yp, yp + B * M * N, 0.0f);
    return ffi::Error::Success();
  }
  ParallelRanges(pool, B, B * M * K * N, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      FloatProduct(xp + b * M * K, wp + b * K * N, yp + b * M * N, M, K, N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KfInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KfBatchedMatmul, BatchedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
