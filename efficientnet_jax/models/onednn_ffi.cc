// XLA FFI handlers that run EfficientNet's convolutions on oneDNN (CPU), for `onednn.py`.
//
// Two targets, both NHWC / channels-last, bfloat16 or float32 activations, float32 bias:
//   ej_onednn_conv    a kxk convolution (the stem, or depthwise with groups = channels), XLA's
//                     HWIO kernel, explicit (TF SAME) padding, bias and an activation;
//   ej_onednn_matmul  x (B, M, K) @ w (Bw, K, N) + bias [+ residual], then an activation: every
//                     1x1 conv, with per-example weights (Bw = B) where squeeze-excite's gate is
//                     folded into the project conv.
// On CPUs with AMX or AVX512_BF16, oneDNN runs bfloat16 on those units, which XLA:CPU does not.
//
// Primitives are created once per shape and attributes and kept (a global map under a mutex).
// Kernels arrive in XLA's plain layout every call, and are reordered into the primitive's
// blocked layout in a per-thread buffer (microseconds for EfficientNet's kernels). Scratchpads are
// per thread, so calls from several XLA threads may run at once.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
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

// 0: none, 1: swish, 2: relu6, 3: relu (the codes onednn.py passes).
bool AppendActivation(dnnl::post_ops* ops, int64_t activation) {
  switch (activation) {
    case 0: return true;
    case 1: ops->append_eltwise(algorithm::eltwise_swish, 1.f, 0.f); return true;
    case 2: ops->append_eltwise(algorithm::eltwise_clip_v2, 0.f, 6.f); return true;
    case 3: ops->append_eltwise(algorithm::eltwise_relu, 0.f, 0.f); return true;
    default: return false;
  }
}

// Per-thread buffers: reordered kernels and scratchpads.
char* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::vector<char> buffers[2];
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

struct ConvPlan {
  dnnl::convolution_forward primitive;
  dnnl::reorder kernel_reorder;
  memory::desc src, user_kernel, kernel, bias, dst, scratchpad;
};

struct MatmulPlan {
  dnnl::matmul primitive;
  memory::desc src, kernel, bias, dst, residual, scratchpad;
};

PlanCache<ConvPlan>& conv_cache() {
  static PlanCache<ConvPlan> plans;
  return plans;
}

ffi::Error Failed(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN: " + what);
}

ffi::Error ConvImpl(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Buffer<ffi::F32> bias,
                    ffi::Result<ffi::AnyBuffer> y, int64_t stride, int64_t pad_top,
                    int64_t pad_bottom, int64_t pad_left, int64_t pad_right, int64_t groups,
                    int64_t activation) {
  memory::data_type type;
  if (!ToDnnl(x.element_type(), &type) || kernel.element_type() != x.element_type() ||
      y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("ej_onednn_conv: x, kernel and y must share bf16 or f32");
  }
  auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("ej_onednn_conv: x, kernel and y must be 4-D");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], kh = kd[0], kw = kd[1],
                out = kd[3], oh = yd[1], ow = yd[2];
  Key key = {n, h, w, c, kh, kw, kd[2], out, oh, ow, stride, pad_top, pad_bottom, pad_left,
             pad_right, groups, activation, static_cast<int64_t>(type)};
  std::shared_ptr<ConvPlan> plan;
  try {
    plan = conv_cache().Get(key, [&]() {
      ConvPlan p;
      p.src = memory::desc({n, c, h, w}, type, memory::format_tag::nhwc);
      p.dst = memory::desc({n, out, oh, ow}, type, memory::format_tag::nhwc);
      p.bias = memory::desc({out}, memory::data_type::f32, memory::format_tag::a);
      if (groups > 1) {  // XLA (kh, kw, 1, C): dims (g, o, i, h, w) laid out h, w, i, g, o
        p.user_kernel = memory::desc({groups, out / groups, c / groups, kh, kw}, type,
                                     memory::format_tag::hwigo);
      } else {  // XLA HWIO
        p.user_kernel = memory::desc({out, c, kh, kw}, type, memory::format_tag::hwio);
      }
      memory::desc any_kernel(p.user_kernel.get_dims(), type, memory::format_tag::any);
      dnnl::post_ops ops;
      AppendActivation(&ops, activation);
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      dnnl::convolution_forward::primitive_desc pd(
          Engine(), dnnl::prop_kind::forward_inference, algorithm::convolution_direct, p.src,
          any_kernel, p.bias, p.dst, {stride, stride}, {pad_top, pad_left},
          {pad_bottom, pad_right}, attr);
      p.kernel = pd.weights_desc();
      p.scratchpad = pd.scratchpad_desc();
      p.primitive = dnnl::convolution_forward(pd);
      p.kernel_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(Engine(), p.user_kernel, Engine(), p.kernel));
      return p;
    });
    dnnl::engine& engine = Engine();
    dnnl::stream& stream = ThreadStream();
    memory user_kernel(plan->user_kernel, engine, kernel.untyped_data());
    memory blocked(plan->kernel, engine, ThreadBuffer(0, plan->kernel.get_size()));
    plan->kernel_reorder.execute(stream, user_kernel, blocked);
    plan->primitive.execute(
        stream, {{DNNL_ARG_SRC, memory(plan->src, engine, x.untyped_data())},
                 {DNNL_ARG_WEIGHTS, blocked},
                 {DNNL_ARG_BIAS, memory(plan->bias, engine, bias.typed_data())},
                 {DNNL_ARG_DST, memory(plan->dst, engine, y->untyped_data())},
                 {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, engine,
                                              ThreadBuffer(1, plan->scratchpad.get_size()))}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failed(std::string("convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

PlanCache<MatmulPlan>& matmul_cache() {
  static PlanCache<MatmulPlan> plans;
  return plans;
}

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Buffer<ffi::F32> bias,
                      const ffi::AnyBuffer* residual, ffi::Result<ffi::AnyBuffer> y,
                      int64_t activation) {
  memory::data_type type;
  if (!ToDnnl(x.element_type(), &type) || kernel.element_type() != x.element_type() ||
      y->element_type() != x.element_type() ||
      (residual && residual->element_type() != x.element_type())) {
    return ffi::Error::InvalidArgument(
        "ej_onednn_matmul: x, kernel, residual and y must share bf16 or f32");
  }
  auto xd = x.dimensions(), kd = kernel.dimensions();
  if (xd.size() != 3 || kd.size() != 3) {
    return ffi::Error::InvalidArgument("ej_onednn_matmul: x and kernel must be 3-D");
  }
  const int64_t b = xd[0], m = xd[1], k = xd[2], bw = kd[0], n = kd[2];
  Key key = {b, m, k, bw, n, activation, residual != nullptr, static_cast<int64_t>(type)};
  std::shared_ptr<MatmulPlan> plan;
  try {
    plan = matmul_cache().Get(key, [&]() {
      MatmulPlan p;
      p.src = memory::desc({b, m, k}, type, memory::format_tag::abc);
      p.kernel = memory::desc({bw, k, n}, type, memory::format_tag::abc);
      p.bias = memory::desc({1, 1, n}, memory::data_type::f32, memory::format_tag::abc);
      p.dst = memory::desc({b, m, n}, type, memory::format_tag::abc);
      dnnl::post_ops ops;
      if (residual) {
        p.residual = p.dst;
        ops.append_binary(algorithm::binary_add, p.residual);
      }
      AppendActivation(&ops, activation);
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      dnnl::matmul::primitive_desc pd(Engine(), p.src, p.kernel, p.bias, p.dst, attr);
      p.scratchpad = pd.scratchpad_desc();
      p.primitive = dnnl::matmul(pd);
      return p;
    });
    dnnl::engine& engine = Engine();
    dnnl::stream& stream = ThreadStream();
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(plan->src, engine, x.untyped_data())},
        {DNNL_ARG_WEIGHTS, memory(plan->kernel, engine, kernel.untyped_data())},
        {DNNL_ARG_BIAS, memory(plan->bias, engine, bias.typed_data())},
        {DNNL_ARG_DST, memory(plan->dst, engine, y->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, engine,
                                     ThreadBuffer(1, plan->scratchpad.get_size()))}};
    if (residual) {
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          memory(plan->residual, engine, residual->untyped_data());
    }
    plan->primitive.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failed(std::string("matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Buffer<ffi::F32> bias,
                  ffi::Result<ffi::AnyBuffer> y, int64_t activation) {
  return MatmulImpl(x, kernel, bias, nullptr, y, activation);
}

ffi::Error MatmulAdd(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Buffer<ffi::F32> bias,
                     ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y, int64_t activation) {
  return MatmulImpl(x, kernel, bias, &residual, y, activation);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EjOnednnMatmulAdd, MatmulAdd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("activation"));

// The oneDNN version this library runs on, for the log line.
extern "C" const char* EjOnednnVersion() {
  static std::string text = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return text.c_str();
}
