// XLA FFI handlers that run a whole EfficientNet's inference on the CPU, for `onednn.py`.
//
//   ej_onednn_network  images (N, H, W, 3) float32 -> logits (N, classes) float32: the stem, every
//                      MBConv block, the head's 1x1 conv and pooling, and the classifier, in one
//                      call, with BatchNorm folded in; bfloat16 or float32 maps.
//   ej_onednn_mbconv   one MBConv block on NHWC maps (the same code, for tests and single blocks).
//   ej_onednn_pack     a (k, n) 1x1 kernel -> the bytes of its oneDNN blocked layout, once, when
//                      the parameters are folded.
//
// The 1x1 convolutions are oneDNN products (matmul primitives: AMX or AVX512_BF16 for bfloat16,
// AVX-512 for float32), everything else is this file's own: the stem, the depthwise convolutions
// (the expanded map's rows are widened once per kernel row and reused across outputs), the
// activations (a cheaper swish than oneDNN's), squeeze-excite and the pooling.
//
// Each block runs image by image, and the expand conv's output in strips of rows: a strip is
// expanded into a cache-sized buffer with the depthwise padding as zero columns, consumed by the
// depthwise conv, and the rows the next strip's taps share are kept. So the wide expanded map
// never reaches memory whole, and the depthwise output is still in cache for the project product.
// With at least as many images as threads each thread carries whole images through the network
// and no thread waits on another; with fewer, the threads split every map's rows and meet at a
// spinning barrier two or three times per block. oneDNN's own threading is off inside (nested
// OpenMP).
//
// Primitives are created once per shape and kept (a global map under a mutex); buffers and
// scratchpads are per thread, so calls from several XLA threads may run at once.
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::algorithm;
using dnnl::memory;
using Key = std::vector<int64_t>;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

bool ToDnnl(ffi::DataType type, memory::data_type* out) {
  if (type == ffi::DataType::BF16) {
    *out = memory::data_type::bf16;
    return true;
  }
  if (type == ffi::DataType::F32) {
    *out = memory::data_type::f32;
    return true;
  }
  return false;
}

// Activation codes (onednn.py's ACTIVATIONS): 0 none, 1 swish, 2 relu6, 3 relu.
constexpr int64_t kActivations = 4;

// Per-thread buffers, grown as needed and kept.
enum Slot {
  kScratchpad,  // oneDNN's
  kStrip,       // rows of the expanded map, with their zero columns
  kDense,       // a product's output before its activation
  kDepthwise,   // one image's depthwise output
  kPooled,      // channel sums, the gate, SE's hidden layer
  kMapA,        // the network's maps, ping and pong
  kMapB,
  kMaps,        // the depthwise outputs of every image, when threads split the rows
  kExpanded,    // small expanded maps, whole, when threads split the rows
  kSlots
};

char* ThreadBuffer(Slot slot, size_t bytes) {
  thread_local std::vector<char> buffers[kSlots];
  if (buffers[slot].size() < bytes) buffers[slot].resize(bytes);
  return buffers[slot].data();
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

template <typename Plan>
class PlanCache {
 public:
  template <typename Make>
  std::shared_ptr<Plan> Get(const Key& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = plans_.find(key);
    if (found != plans_.end()) return found->second;
    auto plan = std::make_shared<Plan>(make());
    plans_.emplace(key, plan);
    return plan;
  }

 private:
  std::mutex mu_;
  std::map<Key, std::shared_ptr<Plan>> plans_;
};

ffi::Error Failed(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN: " + what);
}

// ----------------------------------------------------------------------------- fused MBConv
// One MBConv block per call, image by image, so that its wide maps stay in the core's cache:
//   e = act(x @ We + be)                    oneDNN products on strips of rows (when expanded)
//   d = act(depthwise(e) + bd)              the loops below, strip by strip, summing d for SE
//   g = sigmoid(act(mean(d) Ws1 + bs1) Ws2 + bs2)           (with squeeze-excite)
//   y = (d * g) @ Wp + bp [+ x]             one oneDNN product per image
// The expanded map e never reaches memory whole: a strip of rows (with the rows the next strip's
// taps share kept, not recomputed) is produced and consumed in cache. With at least as many
// images as threads, each thread takes whole images (oneDNN runs single-threaded inside an
// OpenMP region); with fewer, images go one at a time with every thread on each step.

typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

inline V16 Splat(float v) { return V16{} + v; }

inline V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline V16 Load(const uint16_t* p) {  // bfloat16 -> float32: the high half of the bits
  H16 h;
  std::memcpy(&h, p, sizeof h);
  U16 u = __builtin_convertvector(h, U16) << 16;
  V16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }
inline void Store(uint16_t* p, V16 v) {  // float32 -> bfloat16, round to nearest even
#ifdef __AVX512BF16__
  const __m256bh b = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
  std::memcpy(p, &b, sizeof b);
#else
  U16 u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  H16 h = __builtin_convertvector(u, H16);
  std::memcpy(p, &h, sizeof h);
#endif
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void FromFloat(float* p, float v) { *p = v; }
inline void FromFloat(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// exp(x) to float32 precision: 2^n * 2^f with |f| <= 1/2, a degree-6 polynomial for 2^f.
inline V16 Exp(V16 x) {
  x = x < Splat(-87.f) ? Splat(-87.f) : x;
  x = x > Splat(88.f) ? Splat(88.f) : x;
  V16 t = x * 1.44269504088896341f;
  V16 r = (t + 12582912.f) - 12582912.f;  // round to nearest
  V16 f = (t - r) * 0.693147180559945309f;
  V16 p = Splat(1.f / 720) * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  I16 bits = (__builtin_convertvector(r, I16) + 127) << 23;
  V16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / (1 + exp(-x)). With AVX-512: 2^t as a polynomial on t's fraction scaled by 2^round(t)
// (vscalef, which saturates to 0 or inf by itself) and a reciprocal estimate (2^-14), refined
// by a Newton step for float32 outputs; bfloat16 outputs keep 8 bits, so a degree-4 polynomial
// and the estimate are already below their rounding.
template <typename T>
inline V16 Sigmoid(V16 x) {
#ifdef __AVX512F__
  constexpr bool precise = sizeof(T) == 4;
  const __m512 t =
      _mm512_mul_ps(reinterpret_cast<__m512>(x), _mm512_set1_ps(-1.44269504088896341f));
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  // 2^f = sum (f ln2)^i / i!, its coefficients with ln2's powers folded in.
  __m512 p;
  if (precise) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(1.5403530393381606e-4f), f,
                        _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  } else {
    p = _mm512_set1_ps(9.618129107628477e-3f);
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, r), _mm512_set1_ps(1.f));
  __m512 inv = _mm512_rcp14_ps(d);
  if (precise) inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.f)));
  return reinterpret_cast<V16>(inv);
#else
  return 1.f / (Exp(-x) + 1.f);
#endif
}

template <typename T = float>
inline V16 Activate(V16 v, int64_t activation) {
  switch (activation) {
    case 1: return v * Sigmoid<T>(v);
    case 2: v = v < Splat(0.f) ? Splat(0.f) : v; return v > Splat(6.f) ? Splat(6.f) : v;
    case 3: return v < Splat(0.f) ? Splat(0.f) : v;
    default: return v;
  }
}
inline float Activate(float v, int64_t activation) {
  V16 out = Activate(Splat(v), activation);
  return out[0];
}

struct DwArgs {
  int64_t h, w, c, oh, ow, k, stride, pad_top, pad_left, activation;
  const float* kernel;  // (k, k, c), BatchNorm folded
  const float* bias;    // (c)
  // The input rows are held `in_w` pixels wide, input column 0 at column `x0` (zero columns
  // either side, when the rows were written with their padding).
  int64_t in_w, x0;
};

// The same for output columns [ox0, ox1) whose taps all fall inside the row, UR columns at a time:
// each input pixel of a kernel row is loaded (and widened) once for all the columns it feeds, and
// the row's K weights stay in registers.
template <int K, int S, int J, int UR, typename T>
void DepthwiseInterior(const DwArgs& a, const T* in, int64_t iy0, int64_t oy, int64_t cb,
                       int64_t ox0, int64_t ox1, T* out_row, V16* sum) {
  const int64_t c = a.c, iy = oy * a.stride - a.pad_top;
  const int64_t ky0 = std::max<int64_t>(0, -iy), ky1 = std::min<int64_t>(K, a.h - iy);
  constexpr int kSpan = (UR - 1) * S + K;  // input columns feeding UR outputs
  int64_t ox = ox0;
  for (; ox + UR <= ox1; ox += UR) {
    V16 acc[UR][J];
#pragma GCC unroll 8
    for (int u = 0; u < UR; ++u)
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc[u][j] = Load(a.bias + cb + 16 * j);
    const int64_t ix = ox * S - a.pad_left + a.x0;
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      const T* row = in + ((iy + ky - iy0) * a.in_w + ix) * c + cb;
      const float* wrow = a.kernel + ky * K * c + cb;
      V16 wv[K][J];
#pragma GCC unroll 8
      for (int kx = 0; kx < K; ++kx)
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) wv[kx][j] = Load(wrow + kx * c + 16 * j);
#pragma GCC unroll 32
      for (int x = 0; x < kSpan; ++x) {
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) {
          const V16 v = Load(row + x * c + 16 * j);
#pragma GCC unroll 8
          for (int kx = 0; kx < K; ++kx) {
            const int u = (x - kx) / S;
            if ((x - kx) >= 0 && (x - kx) % S == 0 && u < UR) acc[u][j] += v * wv[kx][j];
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < UR; ++u)
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) {
        const V16 v = Activate<T>(acc[u][j], a.activation);
        sum[j] += v;
        Store(out_row + (ox + u) * c + cb + 16 * j, v);
      }
  }
  if (ox < ox1) DepthwiseInterior<K, S, J, 1>(a, in, iy0, oy, cb, ox, ox1, out_row, sum);
}

// Output columns [ox0, ox1) of one output row's channels [cb, cb + 16 * J), any kernel and edge.
template <int J, typename T>
void DepthwiseEdge(const DwArgs& a, const T* in, int64_t iy0, int64_t oy, int64_t cb, int64_t ox0,
                   int64_t ox1, T* out_row, V16* sum) {
  const int64_t k = a.k, c = a.c, iy = oy * a.stride - a.pad_top;
  const int64_t ky0 = std::max<int64_t>(0, -iy), ky1 = std::min<int64_t>(k, a.h - iy);
  for (int64_t ox = ox0; ox < ox1; ++ox) {
    const int64_t ix = ox * a.stride - a.pad_left + a.x0;
    const int64_t kx0 = std::max<int64_t>(0, -ix), kx1 = std::min<int64_t>(k, a.in_w - ix);
    V16 acc[J];
    for (int j = 0; j < J; ++j) acc[j] = Load(a.bias + cb + 16 * j);
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      const T* row = in + ((iy + ky - iy0) * a.in_w + ix) * c + cb;
      const float* wrow = a.kernel + ky * k * c + cb;
      for (int64_t kx = kx0; kx < kx1; ++kx)
        for (int j = 0; j < J; ++j)
          acc[j] += Load(row + kx * c + 16 * j) * Load(wrow + kx * c + 16 * j);
    }
    for (int j = 0; j < J; ++j) {
      const V16 v = Activate<T>(acc[j], a.activation);
      sum[j] += v;
      Store(out_row + ox * c + cb + 16 * j, v);
    }
  }
}

// One output row's channels [cb, cb + 16 * J): the edge columns, then the interior ones.
template <int J, typename T>
void DepthwiseBlock(const DwArgs& a, const T* in, int64_t iy0, int64_t oy, int64_t cb, T* out_row,
                    float* pooled) {
  V16 sum[J] = {};
  // Interior columns: ox * stride - off >= 0 and ox * stride - off + k <= in_w.
  const int64_t off = a.pad_left - a.x0;
  int64_t lo = off > 0 ? (off + a.stride - 1) / a.stride : 0;
  int64_t hi = a.in_w - a.k + off >= 0 ? (a.in_w - a.k + off) / a.stride + 1 : 0;
  lo = std::min(lo, a.ow);
  hi = std::max(lo, std::min(hi, a.ow));
  DepthwiseEdge<J>(a, in, iy0, oy, cb, 0, lo, out_row, sum);
  constexpr int UR = J == 1 ? 8 : 8;
  if (a.k == 3 && a.stride == 1)
    DepthwiseInterior<3, 1, J, UR>(a, in, iy0, oy, cb, lo, hi, out_row, sum);
  else if (a.k == 3 && a.stride == 2)
    DepthwiseInterior<3, 2, J, UR>(a, in, iy0, oy, cb, lo, hi, out_row, sum);
  else if (a.k == 5 && a.stride == 1)
    DepthwiseInterior<5, 1, J, UR>(a, in, iy0, oy, cb, lo, hi, out_row, sum);
  else if (a.k == 5 && a.stride == 2)
    DepthwiseInterior<5, 2, J, UR>(a, in, iy0, oy, cb, lo, hi, out_row, sum);
  else
    DepthwiseEdge<J>(a, in, iy0, oy, cb, lo, hi, out_row, sum);
  DepthwiseEdge<J>(a, in, iy0, oy, cb, hi, a.ow, out_row, sum);
  if (pooled)
    for (int j = 0; j < J; ++j) Store(pooled + cb + 16 * j, Load(pooled + cb + 16 * j) + sum[j]);
}

// Output rows [oy0, oy1) of the depthwise conv (TF SAME padding, bias, activation) from input
// rows [iy0, ...) held in `in` (rows of w * c); adds each channel's sum over them to `pooled`.
template <typename T>
void DepthwiseRows(const DwArgs& a, const T* in, int64_t iy0, int64_t oy0, int64_t oy1, T* out,
                   float* pooled) {
  const int64_t k = a.k, c = a.c;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    T* out_row = out + oy * a.ow * c;
    int64_t cb = 0;
    for (; cb + 32 <= c; cb += 32) DepthwiseBlock<2>(a, in, iy0, oy, cb, out_row, pooled);
    for (; cb + 16 <= c; cb += 16) DepthwiseBlock<1>(a, in, iy0, oy, cb, out_row, pooled);
    const int64_t iy = oy * a.stride - a.pad_top;
    const int64_t ky0 = std::max<int64_t>(0, -iy), ky1 = std::min<int64_t>(k, a.h - iy);
    for (int64_t ch = cb; ch < c; ++ch) {  // fewer than 16 channels left
      float sum = 0;
      for (int64_t ox = 0; ox < a.ow; ++ox) {
        const int64_t ix = ox * a.stride - a.pad_left + a.x0;
        const int64_t kx0 = std::max<int64_t>(0, -ix), kx1 = std::min<int64_t>(k, a.in_w - ix);
        float acc = a.bias[ch];
        for (int64_t ky = ky0; ky < ky1; ++ky)
          for (int64_t kx = kx0; kx < kx1; ++kx)
            acc += ToFloat(in[((iy + ky - iy0) * a.in_w + ix + kx) * c + ch]) *
                   a.kernel[(ky * k + kx) * c + ch];
        acc = Activate(acc, a.activation);
        sum += acc;
        FromFloat(out_row + ox * c + ch, acc);
      }
      if (pooled) pooled[ch] += sum;
    }
  }
}

// to = act(from) over `count` values.
template <typename T>
void Activate(const T* from, T* to, int64_t count, int64_t activation) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) Store(to + i, Activate<T>(Load(from + i), activation));
  for (; i < count; ++i) FromFloat(to + i, Activate(ToFloat(from[i]), activation));
}

// 1x1 kernels are packed once, when the parameters are folded (`ej_onednn_pack`), into the
// blocked layout oneDNN's products take for a (k, n) kernel; every product then names that layout
// (oneDNN picks the same one for every row count, and takes it when named).
memory::desc PackedLayout(int64_t k, int64_t n, memory::data_type type) {
  static std::mutex mu;
  static std::map<Key, memory::desc> layouts;
  std::lock_guard<std::mutex> lock(mu);
  Key key = {k, n, static_cast<int64_t>(type)};
  auto found = layouts.find(key);
  if (found != layouts.end()) return found->second;
  dnnl::matmul::primitive_desc pd(
      Engine(), memory::desc({1, 64, k}, type, memory::format_tag::abc),
      memory::desc({1, k, n}, type, memory::format_tag::any),
      memory::desc({1, 1, n}, memory::data_type::f32, memory::format_tag::abc),
      memory::desc({1, 64, n}, type, memory::format_tag::abc));
  return layouts.emplace(key, pd.weights_desc()).first->second;
}

struct ProductPlan {
  dnnl::matmul primitive;
  memory::desc src, kernel, bias, dst, residual, scratchpad;
};

PlanCache<ProductPlan>& product_cache() {
  static PlanCache<ProductPlan> plans;
  return plans;
}

// x (m, k) @ kernel + bias [+ residual] -> y (m, n), all dense, the kernel packed. (The
// activations are this file's own: cheaper than oneDNN's swish post-op.)
std::shared_ptr<ProductPlan> Product(int64_t m, int64_t k, int64_t n, memory::data_type type,
                                     bool residual) {
  Key key = {m, k, n, static_cast<int64_t>(type), residual};
  return product_cache().Get(key, [&]() {
    ProductPlan p;
    p.src = memory::desc({1, m, k}, type, memory::format_tag::abc);
    p.dst = memory::desc({1, m, n}, type, memory::format_tag::abc);
    p.bias = memory::desc({1, 1, n}, memory::data_type::f32, memory::format_tag::abc);
    p.kernel = PackedLayout(k, n, type);
    dnnl::post_ops ops;
    if (residual) {
      p.residual = p.dst;
      ops.append_binary(algorithm::binary_add, p.residual);
    }
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc pd(Engine(), p.src, p.kernel, p.bias, p.dst, attr);
    p.scratchpad = pd.scratchpad_desc();
    p.primitive = dnnl::matmul(pd);
    return p;
  });
}

void RunProduct(const ProductPlan& plan, const void* packed, const void* x, const float* bias,
                const void* residual, void* y) {
  dnnl::engine& engine = Engine();
  dnnl::stream& stream = ThreadStream();
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SRC, memory(plan.src, engine, const_cast<void*>(x))},
      {DNNL_ARG_WEIGHTS, memory(plan.kernel, engine, const_cast<void*>(packed))},
      {DNNL_ARG_BIAS, memory(plan.bias, engine, const_cast<float*>(bias))},
      {DNNL_ARG_DST, memory(plan.dst, engine, y)},
      {DNNL_ARG_SCRATCHPAD,
       memory(plan.scratchpad, engine, ThreadBuffer(kScratchpad, plan.scratchpad.get_size()))}};
  if (residual) {
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
        memory(plan.residual, engine, const_cast<void*>(residual));
  }
  plan.primitive.execute(stream, args);
  stream.wait();
}

// kernel (k, n) -> its packed bytes.
ffi::Error Pack(ffi::AnyBuffer kernel, ffi::Result<ffi::Buffer<ffi::U8>> packed) {
  memory::data_type type;
  auto kd = kernel.dimensions();
  if (!ToDnnl(kernel.element_type(), &type) || kd.size() != 2)
    return ffi::Error::InvalidArgument("ej_onednn_pack: a 2-D bf16 or f32 kernel");
  try {
    const memory::desc layout = PackedLayout(kd[0], kd[1], type);
    if (static_cast<size_t>(packed->element_count()) != layout.get_size())
      return ffi::Error::InvalidArgument("ej_onednn_pack: the packed size differs from oneDNN's");
    memory plain(memory::desc({1, kd[0], kd[1]}, type, memory::format_tag::abc), Engine(),
                 kernel.untyped_data());
    memory blocked(layout, Engine(), packed->typed_data());
    dnnl::stream& stream = ThreadStream();
    dnnl::reorder(plain, blocked).execute(stream, plain, blocked);
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failed(std::string("pack: ") + e.what());
  }
  return ffi::Error::Success();
}

// The default budget for a strip of expanded rows: with the depthwise output and the kernels,
// well within a core's L2.
constexpr int64_t kStripBytes = 512 * 1024;
// With threads splitting an image's rows, an expanded map up to this size is made whole, each
// thread its own rows, rather than in strips (where the rows both threads' taps need are expanded
// by both: at 7x7 under a 5x5 kernel, 11 rows for 7).
constexpr int64_t kSharedExpandBytes = 1024 * 1024;

// A barrier for the threads of one parallel region that spins (then yields) rather than sleeps:
// OpenMP's own sleeps almost at once once the process has more OpenMP threads than CPUs (each
// XLA thread that calls in brings a team of its own), and waking costs more than a block's step.
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void Wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < (1 << 18)) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0}, generation_{0};
};

// One call's block: shapes, parameters and where the maps are.
template <typename T>
struct Block {
  int64_t n, h, w, cin, e, out, ses, oh, ow, k, stride, activation;
  bool expand, squeeze, residual;
  memory::data_type type;
  DwArgs dw;          // over the held rows of the expanded map (or x itself, unexpanded)
  int64_t strip;      // output rows per strip
  const T* x;
  T* y;
  const float *expand_bias, *se_reduce, *se_reduce_bias, *se_expand, *se_expand_bias,
      *project_bias;
  const void *expand_kernel, *project_kernel;  // packed
  const float* expand_plain;  // or the expand kernel (cin, e) in float32, for ExpandPixels
};

// act(x @ w + bias) for `pixels` pixels of a few input channels (a float32 (cin, e) kernel):
// the expand convs whose input is too narrow for a product to pay (oneDNN's, plus a pass for the
// activation, cost more there). Each pixel's outputs are 8 vectors at a time.
template <int J, typename T>
inline void ExpandChannels(const T* px, int64_t cin, int64_t e, int64_t cb, const float* w,
                           const float* bias, int64_t activation, T* out) {
  V16 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = Load(bias + cb + 16 * j);
  for (int64_t ci = 0; ci < cin; ++ci) {
    const V16 v = Splat(ToFloat(px[ci]));
    const float* row = w + ci * e + cb;
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) acc[j] += v * Load(row + 16 * j);
  }
  for (int j = 0; j < J; ++j) Store(out + cb + 16 * j, Activate<T>(acc[j], activation));
}

template <typename T>
void ExpandPixels(const T* x, int64_t pixels, int64_t cin, int64_t e, const float* w,
                  const float* bias, int64_t activation, T* out) {
  for (int64_t p = 0; p < pixels; ++p) {
    const T* px = x + p * cin;
    T* o = out + p * e;
    int64_t cb = 0;
    for (; cb + 128 <= e; cb += 128) ExpandChannels<8>(px, cin, e, cb, w, bias, activation, o);
    for (; cb + 64 <= e; cb += 64) ExpandChannels<4>(px, cin, e, cb, w, bias, activation, o);
    for (; cb + 16 <= e; cb += 16) ExpandChannels<1>(px, cin, e, cb, w, bias, activation, o);
    for (; cb < e; ++cb) {  // fewer than 16 channels left
      float acc = bias[cb];
      for (int64_t ci = 0; ci < cin; ++ci) acc += ToFloat(px[ci]) * w[ci * e + cb];
      FromFloat(o + cb, Activate(acc, activation));
    }
  }
}

// Input rows [first, first + count) of image `xi` expanded and activated into `rows` (rows of
// dw.in_w pixels, the depthwise padding as zero columns either side).
template <typename T>
void ExpandInto(const Block<T>& b, const T* xi, int64_t first, int64_t count, T* rows) {
  const int64_t in_w = b.dw.in_w, x0 = b.dw.x0, pitch = in_w * b.e, row = b.w * b.e;
  T* dense = nullptr;
  if (!b.expand_plain) {
    // oneDNN's product into a dense buffer (its fast products want dense rows), then each row
    // activated into place between its zero columns.
    dense = reinterpret_cast<T*>(ThreadBuffer(kDense, count * row * sizeof(T)));
    RunProduct(*Product(count * b.w, b.cin, b.e, b.type, false), b.expand_kernel,
               xi + first * b.w * b.cin, b.expand_bias, nullptr, dense);
  }
  for (int64_t r = 0; r < count; ++r) {
    T* to = rows + r * pitch;
    std::memset(to, 0, x0 * b.e * sizeof(T));
    std::memset(to + x0 * b.e + row, 0, (in_w - x0 - b.w) * b.e * sizeof(T));
    if (dense)
      Activate(dense + r * row, to + x0 * b.e, row, b.activation);
    else
      ExpandPixels(xi + (first + r) * b.w * b.cin, b.w, b.cin, b.e, b.expand_plain,
                   b.expand_bias, b.activation, to + x0 * b.e);
  }
}

// Depthwise output rows [oy_lo, oy_hi) of image i into d (its (oh, ow, e) map), with their
// channel sums added to `pooled`. Expanded blocks go strip by strip: the input rows a strip needs
// are expanded into a buffer with the depthwise padding as zero columns around each row (all
// its columns are then interior), keeping the rows the last strip already expanded.
template <typename T>
void ExpandDepthwise(const Block<T>& b, int64_t i, int64_t oy_lo, int64_t oy_hi, T* d,
                     float* pooled) {
  const T* xi = b.x + i * b.h * b.w * b.cin;
  if (!b.expand) {
    DepthwiseRows(b.dw, xi, 0, oy_lo, oy_hi, d, pooled);
    return;
  }
  const int64_t in_w = b.dw.in_w, x0 = b.dw.x0, pitch = in_w * b.e, s = b.stride;
  T* held = reinterpret_cast<T*>(
      ThreadBuffer(kStrip, ((b.strip - 1) * s + b.k) * pitch * sizeof(T)));
  int64_t held_lo = 0, held_hi = 0;  // the input rows in `held`
  for (int64_t oy0 = oy_lo; oy0 < oy_hi; oy0 += b.strip) {
    const int64_t oy1 = std::min(oy_hi, oy0 + b.strip);
    const int64_t lo = std::max<int64_t>(0, oy0 * s - b.dw.pad_top);
    const int64_t hi = std::min<int64_t>(b.h, (oy1 - 1) * s - b.dw.pad_top + b.k);
    const int64_t keep_lo = std::max(lo, held_lo), keep_hi = std::min(hi, held_hi);
    int64_t first = lo;
    if (keep_hi > keep_lo) {
      if (keep_lo != held_lo)
        std::memmove(held, held + (keep_lo - held_lo) * pitch,
                     (keep_hi - keep_lo) * pitch * sizeof(T));
      first = keep_hi;
    }
    if (hi > first) ExpandInto(b, xi, first, hi - first, held + (first - lo) * pitch);
    held_lo = lo;
    held_hi = hi;
    DepthwiseRows(b.dw, held, lo, oy0, oy1, d, pooled);
  }
}

// gate = sigmoid(act(pooled / (oh * ow) @ Ws1 + bs1) @ Ws2 + bs2), written over `pooled`.
template <typename T>
void Gate(const Block<T>& b, float* pooled, float* hidden) {
  const float inv = 1.f / (b.oh * b.ow);
  const int64_t e = b.e, ses = b.ses;
  std::copy(b.se_reduce_bias, b.se_reduce_bias + ses, hidden);
  for (int64_t ch = 0; ch < e; ++ch) {
    const float m = pooled[ch] * inv;
    const float* row = b.se_reduce + ch * ses;
#pragma omp simd
    for (int64_t s = 0; s < ses; ++s) hidden[s] += m * row[s];
  }
  for (int64_t s = 0; s < ses; ++s) hidden[s] = Activate(hidden[s], b.activation);
  std::copy(b.se_expand_bias, b.se_expand_bias + e, pooled);
  for (int64_t s = 0; s < ses; ++s) {
    const float v = hidden[s];
    const float* row = b.se_expand + s * e;
#pragma omp simd
    for (int64_t ch = 0; ch < e; ++ch) pooled[ch] += v * row[ch];
  }
  int64_t ch = 0;
  for (; ch + 16 <= e; ch += 16) Store(pooled + ch, Sigmoid<float>(Load(pooled + ch)));
  for (; ch < e; ++ch) pooled[ch] = 1.f / (1.f + std::exp(-pooled[ch]));
}

// Output pixels [p0, p1) of image i: d's pixels scaled by the gate, projected, plus x's.
template <typename T>
void Project(const Block<T>& b, int64_t i, int64_t p0, int64_t p1, T* d, const float* gate) {
  const int64_t e = b.e;
  if (gate) {
    for (int64_t p = p0; p < p1; ++p) {
      T* row = d + p * e;
      int64_t ch = 0;
      for (; ch + 16 <= e; ch += 16) Store(row + ch, Load(row + ch) * Load(gate + ch));
      for (; ch < e; ++ch) FromFloat(row + ch, ToFloat(row[ch]) * gate[ch]);
    }
  }
  const int64_t image = i * b.oh * b.ow + p0;
  RunProduct(*Product(p1 - p0, e, b.out, b.type, b.residual), b.project_kernel,
             d + p0 * e, b.project_bias,
             b.residual ? static_cast<const void*>(b.x + image * b.cin) : nullptr,
             b.y + image * b.out);
}

// Derived sizes of a block whose shapes and parameter pointers are set; the strip of rows.
template <typename T>
void Shape(Block<T>& b, int64_t strip_bytes) {
  const int64_t pad_h = std::max<int64_t>((b.oh - 1) * b.stride + b.k - b.h, 0);
  const int64_t pad_w = std::max<int64_t>((b.ow - 1) * b.stride + b.k - b.w, 0);
  b.dw.h = b.h, b.dw.w = b.w, b.dw.c = b.e, b.dw.oh = b.oh, b.dw.ow = b.ow, b.dw.k = b.k;
  b.dw.stride = b.stride, b.dw.pad_top = pad_h / 2, b.dw.pad_left = pad_w / 2;
  b.dw.activation = b.activation;
  b.dw.in_w = b.expand ? b.w + pad_w : b.w;
  b.dw.x0 = b.expand ? pad_w / 2 : 0;
  const int64_t row_bytes = b.dw.in_w * b.e * sizeof(T);
  const int64_t budget = strip_bytes > 0 ? strip_bytes : kStripBytes;
  b.strip = std::max<int64_t>(1, (budget / row_bytes - (b.k - b.stride)) / b.stride);
}

// Records the first error of a parallel region.
void Record(std::string* error, const std::exception& e) {
#pragma omp critical(ej_onednn_error)
  if (error->empty()) *error = e.what();
}

// Whether threads splitting an image's rows make this block's expanded map whole together.
template <typename T>
bool SharesExpand(const Block<T>& b) {
  return b.expand && b.h * b.dw.in_w * b.e * sizeof(T) <= kSharedExpandBytes;
}

// Block b on image i by one thread: its depthwise map in d, channel sums in `pooled` (e + ses).
template <typename T>
void WholeBlock(const Block<T>& b, int64_t i, T* d, float* pooled) {
  std::fill(pooled, pooled + b.e + b.ses, 0.f);
  ExpandDepthwise(b, i, 0, b.oh, d, pooled);
  if (b.squeeze) Gate(b, pooled, pooled + b.e);
  Project(b, i, 0, b.oh * b.ow, d, b.squeeze ? pooled : nullptr);
}

// Block b on image i by the `part`-th of `parts` threads that split its rows: the depthwise
// conv by output rows (into the image's map d, channel sums into sums[part * stride]), then,
// once all have summed, each gates and projects its share of the pixels. `map` (where
// SharesExpand(b)): the image's whole expanded map, made by the threads together first, each
// its own input rows; else each expands in strips the rows its taps need. Every thread waits at
// `barrier` as often whatever fails (errors go to `error`). The caller meets its threads again
// before the next block reads this one's output.
template <typename T>
void SplitBlock(const Block<T>& b, int64_t i, int64_t part, int64_t parts, T* map, T* d,
                float* sums, int64_t stride, SpinBarrier& barrier, std::string* error) {
  auto share = [&](int64_t count, int64_t* lo, int64_t* hi) {
    *lo = count * part / parts, *hi = count * (part + 1) / parts;
  };
  float* mine = sums + part * stride;
  std::fill(mine, mine + b.e + b.ses, 0.f);
  int64_t lo, hi;
  if (map) {
    share(b.h, &lo, &hi);
    try {
      if (error->empty() && lo < hi)
        ExpandInto(b, b.x + i * b.h * b.w * b.cin, lo, hi - lo, map + lo * b.dw.in_w * b.e);
    } catch (const std::exception& e) {
      Record(error, e);
    }
    barrier.Wait();
  }
  share(b.oh, &lo, &hi);
  try {
    if (error->empty() && lo < hi) {
      if (map)
        DepthwiseRows(b.dw, map, 0, lo, hi, d, mine);
      else
        ExpandDepthwise(b, i, lo, hi, d, mine);
    }
  } catch (const std::exception& e) {
    Record(error, e);
  }
  barrier.Wait();
  try {
    std::vector<float> gate(b.e + b.ses, 0.f);
    if (b.squeeze) {
      for (int64_t q = 0; q < parts; ++q)
        for (int64_t ch = 0; ch < b.e; ++ch) gate[ch] += sums[q * stride + ch];
      Gate(b, gate.data(), gate.data() + b.e);
    }
    // The product splits by pixels, evenly, where the depthwise split by rows.
    share(b.oh * b.ow, &lo, &hi);
    if (error->empty() && lo < hi) Project(b, i, lo, hi, d, b.squeeze ? gate.data() : nullptr);
  } catch (const std::exception& e) {
    Record(error, e);
  }
}

// Per block, the `kBlockConfig` integers of the network's `blocks` attribute, and the
// parameters it takes from the remaining arguments, in order.
constexpr int kBlockConfig = 9;  // cin, e, out, k, stride, expand, squeeze, residual, se width
constexpr int kBlockArgs = 10;   // expand (packed, or float32 (cin, e)), bias;
                                 // dw kernel (k, k, e), bias;
                                 // SE reduce (e, s), bias, expand (s, e), bias;
                                 // project (packed), bias

// Block b's parameters, params[first, first + kBlockArgs), on its shapes (h, w, cin, e, out, k,
// stride, oh, ow, expand, squeeze, residual, ses, type, activation set): each checked against
// them (an error naming `where` and the parameter), then b's pointers and derived sizes set.
template <typename T>
ffi::Error BindBlock(Block<T>& b, const ffi::RemainingArgs& params, size_t first,
                     int64_t strip_bytes, const std::string& where) {
  if ((!b.expand && b.e != b.cin) || b.oh != (b.h + b.stride - 1) / b.stride ||
      b.ow != (b.w + b.stride - 1) / b.stride ||
      (b.residual && (b.stride != 1 || b.out != b.cin)))
    return ffi::Error::InvalidArgument(where + "'s shapes do not follow");
  const void* p[kBlockArgs];
  bool plain = false;
  for (int q = 0; q < kBlockArgs; ++q) {
    auto buffer = params.get<ffi::AnyBuffer>(first + q);
    if (!buffer.has_value()) return buffer.error();
    int64_t count = -1;  // the elements it must hold; -1: not read
    switch (q) {
      case 0:  // packed bytes for oneDNN, or float32 (cin, e) for ExpandPixels
        plain = b.expand && buffer->element_type() == ffi::DataType::F32;
        count = !b.expand ? -1 : plain ? b.cin * b.e
                                       : static_cast<int64_t>(
                                             PackedLayout(b.cin, b.e, b.type).get_size());
        break;
      case 1: count = b.expand ? b.e : -1; break;
      case 2: count = b.k * b.k * b.e; break;
      case 3: count = b.e; break;
      case 4: case 6: count = b.squeeze ? b.e * b.ses : -1; break;
      case 5: count = b.squeeze ? b.ses : -1; break;
      case 7: count = b.squeeze ? b.e : -1; break;
      case 8: count = static_cast<int64_t>(PackedLayout(b.e, b.out, b.type).get_size()); break;
      case 9: count = b.out; break;
    }
    if (count >= 0 && static_cast<int64_t>(buffer->element_count()) != count)
      return ffi::Error::InvalidArgument(where + ", parameter " + std::to_string(q) +
                                         ": wrong size");
    p[q] = buffer->untyped_data();
  }
  b.expand_kernel = p[0], b.expand_bias = static_cast<const float*>(p[1]);
  b.expand_plain = plain ? static_cast<const float*>(p[0]) : nullptr;
  b.dw.kernel = static_cast<const float*>(p[2]), b.dw.bias = static_cast<const float*>(p[3]);
  b.se_reduce = static_cast<const float*>(p[4]);
  b.se_reduce_bias = static_cast<const float*>(p[5]);
  b.se_expand = static_cast<const float*>(p[6]);
  b.se_expand_bias = static_cast<const float*>(p[7]);
  b.project_kernel = p[8], b.project_bias = static_cast<const float*>(p[9]);
  Shape(b, strip_bytes);
  return ffi::Error::Success();
}

// Runs one block over every image; returns oneDNN's error, if any.
template <typename T>
std::string RunBlock(const Block<T>& b) {
  std::string error;
  const int threads = omp_get_max_threads();
  const int64_t pool = b.e + b.ses;  // channel sums (then the gate), and SE's hidden layer
  if (b.n >= threads) {
    // Whole images per thread: d stays in the core's cache from the depthwise to the product.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < b.n; ++i) {
      try {
        T* d = reinterpret_cast<T*>(ThreadBuffer(kDepthwise, b.oh * b.ow * b.e * sizeof(T)));
        WholeBlock(b, i, d, reinterpret_cast<float*>(ThreadBuffer(kPooled, pool * sizeof(float))));
      } catch (const std::exception& e) {
        Record(&error, e);
      }
    }
    return error;
  }
  // Fewer images than threads: each image's rows split between threads.
  const int64_t parts = std::min<int64_t>(threads / b.n, b.oh), items = b.n * parts;
  const int64_t map = b.oh * b.ow * b.e, whole = SharesExpand(b) ? b.h * b.dw.in_w * b.e : 0;
  T* maps = reinterpret_cast<T*>(ThreadBuffer(kMaps, b.n * map * sizeof(T)));
  T* expanded = reinterpret_cast<T*>(ThreadBuffer(kExpanded, b.n * whole * sizeof(T)));
  std::vector<float> sums(items * pool, 0.f);
  SpinBarrier barrier(items);
#pragma omp parallel num_threads(items)
  {
    const int64_t item = omp_get_thread_num(), i = item / parts, part = item % parts;
    SplitBlock(b, i, part, parts, whole ? expanded + i * whole : nullptr, maps + i * map,
               &sums[i * parts * pool], pool, barrier, &error);
  }
  return error;
}

template <typename T>
ffi::Error MbconvImpl(ffi::AnyBuffer x, ffi::RemainingArgs params, ffi::Result<ffi::AnyBuffer> y,
                      int64_t stride, int64_t activation, bool expand, bool squeeze,
                      bool residual, int64_t strip_bytes, memory::data_type type) {
  auto xd = x.dimensions(), yd = y->dimensions();
  auto dw = params.get<ffi::AnyBuffer>(2), se = params.get<ffi::AnyBuffer>(4);
  if (params.size() != kBlockArgs || !dw.has_value() || !se.has_value() || xd.size() != 4 ||
      yd.size() != 4 || dw->dimensions().size() != 3 || yd[0] != xd[0] ||
      dw->dimensions()[0] != dw->dimensions()[1] || (squeeze && se->dimensions().size() != 2))
    return ffi::Error::InvalidArgument(
        "ej_onednn_mbconv: x and y (N, H, W, C), then the block's 10 parameters, the depthwise "
        "kernel (k, k, E), SE's reduce kernel (E, S)");
  Block<T> b{};
  b.n = xd[0], b.h = xd[1], b.w = xd[2], b.cin = xd[3];
  b.k = dw->dimensions()[0], b.e = dw->dimensions()[2];
  b.out = yd[3], b.oh = yd[1], b.ow = yd[2], b.stride = stride, b.activation = activation;
  b.expand = expand, b.squeeze = squeeze, b.residual = residual, b.type = type;
  b.ses = squeeze ? se->dimensions()[1] : 0;
  b.x = static_cast<const T*>(x.untyped_data());
  b.y = static_cast<T*>(y->untyped_data());
  std::string error;
  try {
    ffi::Error bound = BindBlock(b, params, 0, strip_bytes, "ej_onednn_mbconv: the block");
    if (bound.failure()) return bound;
    error = RunBlock(b);
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!error.empty()) return Failed("mbconv: " + error);
  return ffi::Error::Success();
}

ffi::Error Mbconv(ffi::AnyBuffer x, ffi::RemainingArgs params, ffi::Result<ffi::AnyBuffer> y,
                  int64_t stride, int64_t activation, bool expand, bool squeeze, bool residual,
                  int64_t strip_bytes) {
  memory::data_type type;
  if (!ToDnnl(x.element_type(), &type) || y->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("ej_onednn_mbconv: x and y must share bf16 or f32");
  if (activation < 0 || activation >= kActivations || stride < 1)
    return ffi::Error::InvalidArgument("ej_onednn_mbconv: unknown activation or stride");
  if (type == memory::data_type::bf16)
    return MbconvImpl<uint16_t>(x, params, y, stride, activation, expand, squeeze, residual,
                                strip_bytes, type);
  return MbconvImpl<float>(x, params, y, stride, activation, expand, squeeze, residual,
                           strip_bytes, type);
}

// ----------------------------------------------------------------------------- whole network
// The stem, every MBConv block and the head's 1x1 conv with its pooling, as one call: with at
// least as many images as threads each thread carries whole images through the network (its
// maps stay in its core's cache from the stem to the pooling, and no thread waits on another);
// with fewer, the threads split each map's rows and meet twice per block (after the depthwise,
// for squeeze-excite's sums, and after the project, whose rows the next block's taps share), and
// once more before the depthwise where they make a small expanded map together (SplitBlock).

struct Stem {
  int64_t h, w, cin, out, oh, ow, k, stride, pad_top, pad_left, activation;
  const float* kernel;  // (k, k, cin, out), BatchNorm folded
  const float* bias;
};

// Output channels [cb, cb + 16 * J) of the stem conv at one output pixel.
template <int J, typename T>
inline void StemPixel(const Stem& s, const float* in, int64_t oy, int64_t ox, int64_t cb, T* o) {
  const int64_t iy = oy * s.stride - s.pad_top, ix = ox * s.stride - s.pad_left;
  if (s.k == 3 && s.cin == 3 && iy >= 0 && ix >= 0 && iy + 3 <= s.h && ix + 3 <= s.w) {
    // The usual stem (3x3 over RGB) away from the border: 27 taps, unrolled.
    V16 acc[J];
    for (int j = 0; j < J; ++j) acc[j] = Load(s.bias + cb + 16 * j);
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
      const float* px = in + ((iy + ky) * s.w + ix) * 3;
      const float* wk = s.kernel + ky * 9 * s.out + cb;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const V16 v = Splat(px[t]);
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) acc[j] += v * Load(wk + t * s.out + 16 * j);
      }
    }
    for (int j = 0; j < J; ++j) Store(o + cb + 16 * j, Activate<T>(acc[j], s.activation));
    return;
  }
  V16 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = Load(s.bias + cb + 16 * j);
  for (int64_t ky = std::max<int64_t>(0, -iy); ky < std::min<int64_t>(s.k, s.h - iy); ++ky)
    for (int64_t kx = std::max<int64_t>(0, -ix); kx < std::min<int64_t>(s.k, s.w - ix); ++kx) {
      const float* px = in + ((iy + ky) * s.w + ix + kx) * s.cin;
      const float* wk = s.kernel + (ky * s.k + kx) * s.cin * s.out + cb;
      for (int64_t ci = 0; ci < s.cin; ++ci) {
        const V16 v = Splat(px[ci]);
        for (int j = 0; j < J; ++j) acc[j] += v * Load(wk + ci * s.out + 16 * j);
      }
    }
  for (int j = 0; j < J; ++j) Store(o + cb + 16 * j, Activate<T>(acc[j], s.activation));
}

// Output rows [oy0, oy1) of the stem conv of one float32 image.
template <typename T>
void StemRows(const Stem& s, const float* in, T* out, int64_t oy0, int64_t oy1) {
  for (int64_t oy = oy0; oy < oy1; ++oy)
    for (int64_t ox = 0; ox < s.ow; ++ox) {
      T* o = out + (oy * s.ow + ox) * s.out;
      int64_t cb = 0;
      for (; cb + 64 <= s.out; cb += 64) StemPixel<4>(s, in, oy, ox, cb, o);
      for (; cb + 32 <= s.out; cb += 32) StemPixel<2>(s, in, oy, ox, cb, o);
      for (; cb + 16 <= s.out; cb += 16) StemPixel<1>(s, in, oy, ox, cb, o);
      const int64_t iy = oy * s.stride - s.pad_top, ix = ox * s.stride - s.pad_left;
      for (int64_t co = cb; co < s.out; ++co) {  // fewer than 16 channels left
        float acc = s.bias[co];
        for (int64_t ky = std::max<int64_t>(0, -iy); ky < std::min<int64_t>(s.k, s.h - iy); ++ky)
          for (int64_t kx = std::max<int64_t>(0, -ix); kx < std::min<int64_t>(s.k, s.w - ix); ++kx)
            for (int64_t ci = 0; ci < s.cin; ++ci)
              acc += in[((iy + ky) * s.w + ix + kx) * s.cin + ci] *
                     s.kernel[((ky * s.k + kx) * s.cin + ci) * s.out + co];
        FromFloat(o + co, Activate(acc, s.activation));
      }
    }
}

struct Head {
  int64_t h, w, cin, out, activation;
  const void* kernel;  // packed (cin, out)
  const float* bias;
  memory::data_type type;
};

// The head's 1x1 conv over pixels [p0, p1) of one image, activated, summed into `sums` (out).
template <typename T>
void HeadRows(const Head& hd, const T* in, int64_t p0, int64_t p1, float* sums) {
  T* buf = reinterpret_cast<T*>(ThreadBuffer(kDense, (p1 - p0) * hd.out * sizeof(T)));
  RunProduct(*Product(p1 - p0, hd.cin, hd.out, hd.type, false), hd.kernel,
             in + p0 * hd.cin, hd.bias, nullptr, buf);
  for (int64_t p = 0; p < p1 - p0; ++p) {
    const T* row = buf + p * hd.out;
    int64_t c = 0;
    for (; c + 16 <= hd.out; c += 16)
      Store(sums + c, Load(sums + c) + Activate<T>(Load(row + c), hd.activation));
    for (; c < hd.out; ++c) sums[c] += Activate(ToFloat(row[c]), hd.activation);
  }
}

template <typename T>
std::string RunNetwork(int64_t n, const float* images, const Stem& stem,
                       const std::vector<Block<T>>& blocks, const Head& head, float* features) {
  int64_t largest = stem.oh * stem.ow * stem.out, widest = 1, pool = 1;
  for (const Block<T>& b : blocks) {
    largest = std::max({largest, b.oh * b.ow * b.out, b.h * b.w * b.cin});
    widest = std::max(widest, b.oh * b.ow * b.e);
    pool = std::max(pool, b.e + b.ses);
  }
  const int threads = omp_get_max_threads();
  const int64_t image_in = stem.h * stem.w * stem.cin, pixels = head.h * head.w;
  std::string error;
  if (n >= threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
      try {
        T* a = reinterpret_cast<T*>(ThreadBuffer(kMapA, largest * sizeof(T)));
        T* c = reinterpret_cast<T*>(ThreadBuffer(kMapB, largest * sizeof(T)));
        T* d = reinterpret_cast<T*>(ThreadBuffer(kDepthwise, widest * sizeof(T)));
        float* pooled = reinterpret_cast<float*>(ThreadBuffer(kPooled, pool * sizeof(float)));
        StemRows(stem, images + i * image_in, a, 0, stem.oh);
        for (Block<T> b : blocks) {
          b.x = a, b.y = c;
          WholeBlock(b, 0, d, pooled);
          std::swap(a, c);
        }
        float* out = features + i * head.out;
        std::fill(out, out + head.out, 0.f);
        HeadRows(head, a, 0, pixels, out);
        for (int64_t ch = 0; ch < head.out; ++ch) out[ch] /= pixels;
      } catch (const std::exception& e) {
        Record(&error, e);
      }
    }
    return error;
  }
  // Fewer images than threads: rows split, the maps of every image shared.
  const int64_t parts = std::max<int64_t>(1, threads / n), items = n * parts;
  T* a = reinterpret_cast<T*>(ThreadBuffer(kMapA, n * largest * sizeof(T)));
  T* c = reinterpret_cast<T*>(ThreadBuffer(kMapB, n * largest * sizeof(T)));
  T* d = reinterpret_cast<T*>(ThreadBuffer(kMaps, n * widest * sizeof(T)));
  int64_t shared_expand = 0;  // the largest expanded map shared between threads
  for (const Block<T>& b : blocks)
    if (SharesExpand(b)) shared_expand = std::max(shared_expand, b.h * b.dw.in_w * b.e);
  T* expanded = reinterpret_cast<T*>(ThreadBuffer(kExpanded, n * shared_expand * sizeof(T)));
  std::vector<float> sums(items * std::max(pool, head.out));
  const int64_t stride_sums = std::max(pool, head.out);
  SpinBarrier barrier(items);
#pragma omp parallel num_threads(items)
  {
    const int64_t item = omp_get_thread_num(), i = item / parts, part = item % parts;
    float* mine = &sums[item * stride_sums];
    auto rows = [&](int64_t count, int64_t* lo, int64_t* hi) {
      *lo = count * part / parts, *hi = count * (part + 1) / parts;
    };
    T *from = a + i * largest, *to = c + i * largest, *di = d + i * widest;
    int64_t lo, hi;
    try {
      rows(stem.oh, &lo, &hi);
      StemRows(stem, images + i * image_in, from, lo, hi);
    } catch (const std::exception& e) {
      Record(&error, e);
    }
    barrier.Wait();
    for (Block<T> b : blocks) {
      b.x = from, b.y = to;
      SplitBlock(b, 0, part, parts, SharesExpand(b) ? expanded + i * shared_expand : nullptr, di,
                 &sums[i * parts * stride_sums], stride_sums, barrier, &error);
      barrier.Wait();
      std::swap(from, to);
    }
    std::fill(mine, mine + head.out, 0.f);
    rows(pixels, &lo, &hi);
    try {
      if (error.empty() && lo < hi) HeadRows(head, from, lo, hi, mine);
    } catch (const std::exception& e) {
      Record(&error, e);
    }
    barrier.Wait();
    if (part == 0) {
      float* out = features + i * head.out;
      for (int64_t ch = 0; ch < head.out; ++ch) {
        float total = 0;
        for (int64_t q = 0; q < parts; ++q) total += sums[(i * parts + q) * stride_sums + ch];
        out[ch] = total / pixels;
      }
    }
  }
  return error;
}

template <typename T>
ffi::Error NetworkImpl(ffi::Buffer<ffi::F32> images, ffi::Buffer<ffi::F32> stem_kernel,
                       ffi::Buffer<ffi::F32> stem_bias, ffi::Buffer<ffi::U8> top_kernel,
                       ffi::Buffer<ffi::F32> top_bias, ffi::Buffer<ffi::U8> classifier,
                       ffi::Buffer<ffi::F32> classifier_bias, ffi::RemainingArgs params,
                       ffi::Result<ffi::Buffer<ffi::F32>> logits, ffi::Span<const int64_t> config,
                       int64_t stem_stride, int64_t activation, int64_t strip_bytes,
                       memory::data_type type) {
  auto bad = [](const std::string& what) {
    return ffi::Error::InvalidArgument("ej_onednn_network: " + what);
  };
  auto xd = images.dimensions(), sd = stem_kernel.dimensions(), ld = logits->dimensions();
  if (xd.size() != 4 || sd.size() != 4 || ld.size() != 2 || sd[2] != xd[3] || sd[0] != sd[1] ||
      ld[0] != xd[0] || config.size() % kBlockConfig != 0 ||
      params.size() != config.size() / kBlockConfig * kBlockArgs)
    return bad("images (N, H, W, C), stem kernel (k, k, C, O), logits (N, classes), 9 integers "
               "and 10 parameters per block");
  const int64_t features = top_bias.element_count(), classes = ld[1];
  const int64_t n = xd[0];
  Stem stem{xd[1], xd[2], xd[3], sd[3], (xd[1] + stem_stride - 1) / stem_stride,
            (xd[2] + stem_stride - 1) / stem_stride, sd[0], stem_stride, 0, 0, activation,
            stem_kernel.typed_data(), stem_bias.typed_data()};
  stem.pad_top = std::max<int64_t>((stem.oh - 1) * stem_stride + stem.k - stem.h, 0) / 2;
  stem.pad_left = std::max<int64_t>((stem.ow - 1) * stem_stride + stem.k - stem.w, 0) / 2;
  if (stem_bias.element_count() != stem.out) return bad("the stem's bias");
  std::vector<Block<T>> blocks;
  int64_t h = stem.oh, w = stem.ow, channels = stem.out;
  try {
    for (size_t j = 0; j < config.size() / kBlockConfig; ++j) {
      const int64_t* cfg = &config[j * kBlockConfig];
      Block<T> b{};
      b.n = 1, b.h = h, b.w = w, b.cin = cfg[0], b.e = cfg[1], b.out = cfg[2], b.k = cfg[3];
      b.stride = cfg[4], b.expand = cfg[5], b.squeeze = cfg[6], b.residual = cfg[7];
      b.ses = b.squeeze ? cfg[8] : 0, b.activation = activation, b.type = type;
      b.oh = (h + b.stride - 1) / b.stride, b.ow = (w + b.stride - 1) / b.stride;
      if (b.cin != channels) return bad("block " + std::to_string(j) + "'s shapes do not follow");
      ffi::Error bound = BindBlock(b, params, j * kBlockArgs, strip_bytes,
                                   "ej_onednn_network: block " + std::to_string(j));
      if (bound.failure()) return bound;
      blocks.push_back(b);
      h = b.oh, w = b.ow, channels = b.out;
    }
    Head head{h, w, channels, features, activation, top_kernel.typed_data(),
              top_bias.typed_data(), type};
    if (static_cast<size_t>(top_kernel.element_count()) !=
        PackedLayout(channels, features, type).get_size())
      return bad("the head's kernel is not packed for its shapes");
    const memory::data_type f32 = memory::data_type::f32;
    if (static_cast<size_t>(classifier.element_count()) !=
            PackedLayout(features, classes, f32).get_size() ||
        classifier_bias.element_count() != classes)
      return bad("the classifier's kernel is not packed (float32) for its shapes, or its bias");
    // The pooled features of every image, then the classifier on them all in one product.
    std::vector<float> pooled(n * features);
    std::string error = RunNetwork<T>(n, images.typed_data(), stem, blocks, head, pooled.data());
    if (!error.empty()) return Failed("network: " + error);
    RunProduct(*Product(n, features, classes, f32, false), classifier.typed_data(),
               pooled.data(), classifier_bias.typed_data(), nullptr, logits->typed_data());
  } catch (const dnnl::error& e) {
    return Failed(std::string("network: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Network(ffi::Buffer<ffi::F32> images, ffi::Buffer<ffi::F32> stem_kernel,
                   ffi::Buffer<ffi::F32> stem_bias, ffi::Buffer<ffi::U8> top_kernel,
                   ffi::Buffer<ffi::F32> top_bias, ffi::Buffer<ffi::U8> classifier,
                   ffi::Buffer<ffi::F32> classifier_bias, ffi::RemainingArgs params,
                   ffi::Result<ffi::Buffer<ffi::F32>> logits, ffi::Span<const int64_t> config,
                   int64_t stem_stride, int64_t activation, int64_t strip_bytes, bool bf16) {
  if (activation < 0 || activation >= kActivations || stem_stride < 1)
    return ffi::Error::InvalidArgument("ej_onednn_network: unknown activation or stem stride");
  for (size_t j = 4; j < config.size(); j += kBlockConfig)
    if (config[j] < 1) return ffi::Error::InvalidArgument("ej_onednn_network: a block's stride");
  if (bf16)
    return NetworkImpl<uint16_t>(images, stem_kernel, stem_bias, top_kernel, top_bias, classifier,
                                 classifier_bias, params, logits, config, stem_stride, activation,
                                 strip_bytes, memory::data_type::bf16);
  return NetworkImpl<float>(images, stem_kernel, stem_bias, top_kernel, top_bias, classifier,
                            classifier_bias, params, logits, config, stem_stride, activation,
                            strip_bytes, memory::data_type::f32);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnMbconv, Mbconv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("activation")
                                  .Attr<bool>("expand")
                                  .Attr<bool>("squeeze")
                                  .Attr<bool>("residual")
                                  .Attr<int64_t>("strip_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnNetwork, Network,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("blocks")
                                  .Attr<int64_t>("stem_stride")
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("strip_bytes")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnPack, Pack,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>());

// Bytes of a (k, n) kernel packed for oneDNN's products (bf16 if `bf16`, else f32); -1 if
// oneDNN cannot make such a product.
extern "C" int64_t EjOnednnPackedBytes(int64_t k, int64_t n, int32_t bf16) {
  try {
    return static_cast<int64_t>(
        PackedLayout(k, n, bf16 ? memory::data_type::bf16 : memory::data_type::f32).get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}

// The oneDNN version this library runs on, for the log line.
extern "C" const char* EjOnednnVersion() {
  static std::string text = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return text.c_str();
}
