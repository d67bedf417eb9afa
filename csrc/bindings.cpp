// scattermoe._C: pybind11 bindings of the csrc kernels. Torch-free on purpose (DESIGN.md 3b):
// every tensor arrives as a device address (tensor.data_ptr()), shapes and strides as ints in
// elements, the stream as torch.cuda.current_stream().cuda_stream. The module links the CUDA
// runtime statically and imports on a machine with no GPU and no driver; there every call that
// touches CUDA raises scattermoe._C.CudaError (cudaErrorInsufficientDriver, error 35).
//
// Compiled by the host compiler (no CUTLASS here); the kernels live in the nvcc-compiled .cu files.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "scattermoe/check.h"
#include "scattermoe/glu_backward.h"
#include "scattermoe/group_bwd_w.h"
#include "scattermoe/grouped_gemm.h"
#include "scattermoe/scatter_gemm.h"

namespace py = pybind11;

namespace scattermoe {
void build_versions(int* nvcc_major, int* nvcc_minor, int* cutlass_major, int* cutlass_minor, int* cutlass_patch,
                    int* cudart);
}  // namespace scattermoe

namespace {

using scattermoe::GluBackwardParams;
using scattermoe::GroupBwdWParams;
using scattermoe::GroupedGemmParams;
using scattermoe::ScatterGemmParams;

// Runtime flags to template parameters (flash-attention's switch helpers).
template <class F>
auto dtype_switch(const std::string& dtype, F&& f) {
  if (dtype == "bfloat16") return f(scattermoe::Bf16{});
  if (dtype == "float16") return f(scattermoe::Fp16{});
  scattermoe::throw_invalid_argument(__FILE__, __LINE__, "dtype: expected 'bfloat16' or 'float16', got '", dtype, "'");
}

template <class F>
auto bool_switch(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// f(dtype tag, std::bool_constant<w_k_major>): the template instance for a runtime (dtype, W layout).
template <class F>
auto kernel_switch(const std::string& dtype, bool w_k_major, F&& f) {
  return dtype_switch(dtype, [&](auto tag) {
    return bool_switch(w_k_major, [&](auto k_major) { return f(tag, k_major); });
  });
}

template <class T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

int checked_int(int64_t v, const char* name) {
  SMOE_CHECK(v >= INT32_MIN && v <= INT32_MAX, name, ": expected a 32-bit int, got ", v);
  return static_cast<int>(v);
}

// Never raises: the Python side turns the answer into "why the cutlass backend cannot run".
py::dict cuda_probe() {
  py::dict out;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  cudaGetLastError();
  int driver = 0;
  cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  cudaGetLastError();
  out["error"] = static_cast<int>(err);
  out["error_name"] = std::string(cudaGetErrorName(err));
  out["error_string"] = std::string(cudaGetErrorString(err));
  out["device_count"] = err == cudaSuccess ? count : 0;
  out["driver_version"] = driver;
  out["runtime_version"] = CUDART_VERSION;
  return out;
}

py::tuple device_capability(int device) {
  int major = 0, minor = 0;
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return py::make_tuple(major, minor);
}

int multiprocessor_count(int device) {
  int count = 0;
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

py::dict build_info() {
  int nvcc_major, nvcc_minor, cutlass_major, cutlass_minor, cutlass_patch, cudart;
  scattermoe::build_versions(&nvcc_major, &nvcc_minor, &cutlass_major, &cutlass_minor, &cutlass_patch, &cudart);
  py::dict out;
  out["archs"] = py::make_tuple("sm_90a");
  out["nvcc"] = std::to_string(nvcc_major) + "." + std::to_string(nvcc_minor);
  out["cutlass"] = std::to_string(cutlass_major) + "." + std::to_string(cutlass_minor) + "." +
                   std::to_string(cutlass_patch);
  out["cudart"] = cudart;
  out["grouped_gemm_tile"] = py::make_tuple(scattermoe::kGroupedGemmTileM, scattermoe::kGroupedGemmTileN,
                                            scattermoe::kGroupedGemmTileK);
  out["scatter_gemm_tile"] = py::make_tuple(scattermoe::kScatterGemmTileM, scattermoe::kScatterGemmTileN,
                                            scattermoe::kScatterGemmTileK);
  out["dtypes"] = py::make_tuple("bfloat16", "float16");
  return out;
}

size_t grouped_gemm_workspace_bytes(const std::string& dtype, bool w_k_major, int64_t num_experts, int64_t sm_count) {
  SMOE_CHECK(num_experts >= 1, "num_experts: expected >= 1, got ", num_experts);
  SMOE_CHECK(sm_count >= 1, "sm_count: expected >= 1, got ", sm_count);
  const int e = checked_int(num_experts, "num_experts");
  const int sms = checked_int(sm_count, "sm_count");
  return kernel_switch(dtype, w_k_major, [&](auto tag, auto k_major) {
    return scattermoe::grouped_gemm_workspace_bytes_sm90<decltype(tag), decltype(k_major)::value>(e, sms);
  });
}

void grouped_gemm(const std::string& dtype, bool w_k_major, uintptr_t x, int64_t stride_xm, uintptr_t w,
                  int64_t stride_we, int64_t stride_w_ld, uintptr_t bias, int64_t stride_be, uintptr_t y,
                  int64_t stride_ym, uintptr_t expert_offsets, bool offsets_int64, int64_t num_experts,
                  int64_t num_rows, int64_t k_in, int64_t n_out, uintptr_t workspace, size_t workspace_bytes,
                  int64_t device, int64_t sm_count, uintptr_t stream) {
  GroupedGemmParams p;
  p.x = as_ptr<const void>(x);
  p.stride_xm = stride_xm;
  p.w = as_ptr<const void>(w);
  p.stride_we = stride_we;
  p.stride_w_ld = stride_w_ld;
  p.bias = as_ptr<const void>(bias);
  p.stride_be = stride_be;
  p.y = as_ptr<void>(y);
  p.stride_ym = stride_ym;
  p.expert_offsets = as_ptr<const void>(expert_offsets);
  p.offsets_int64 = offsets_int64;
  p.num_experts = checked_int(num_experts, "num_experts");
  p.num_rows = num_rows;
  p.k_in = checked_int(k_in, "k_in");
  p.n_out = checked_int(n_out, "n_out");
  p.workspace = as_ptr<void>(workspace);
  p.workspace_bytes = workspace_bytes;
  p.device = checked_int(device, "device");
  p.sm_count = checked_int(sm_count, "sm_count");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release release;  // the launch is asynchronous, but CUTLASS's host setup is not free
  kernel_switch(dtype, w_k_major, [&](auto tag, auto k_major) {
    scattermoe::grouped_gemm_sm90<decltype(tag), decltype(k_major)::value>(p, s);
    return 0;
  });
}

bool scatter_gemm(const std::string& dtype, bool w_k_major, uintptr_t x, int64_t stride_xm, int64_t x_rows,
                  uintptr_t w, int64_t stride_we, int64_t stride_w_ld, uintptr_t bias, int64_t stride_be, uintptr_t y,
                  int64_t stride_ym, int64_t y_rows, uintptr_t gates, uintptr_t sorted_scattered_idxs,
                  uintptr_t expert_offsets, bool offsets_int64, bool x_grouped, bool y_grouped, int64_t fan_out,
                  int64_t num_experts, int64_t num_rows, int64_t k_in, int64_t n_out, int64_t glu, uintptr_t pre,
                  int64_t stride_pm, int64_t pre_rows, int64_t num_ctas, bool w_tma, int64_t device,
                  uintptr_t stream) {
  ScatterGemmParams p;
  p.x = as_ptr<const void>(x);
  p.stride_xm = stride_xm;
  p.x_rows = x_rows;
  p.w = as_ptr<const void>(w);
  p.stride_we = stride_we;
  p.stride_w_ld = stride_w_ld;
  p.bias = as_ptr<const void>(bias);
  p.stride_be = stride_be;
  p.y = as_ptr<void>(y);
  p.stride_ym = stride_ym;
  p.y_rows = y_rows;
  p.gates = as_ptr<const void>(gates);
  p.sorted_scattered_idxs = as_ptr<const int64_t>(sorted_scattered_idxs);
  p.expert_offsets = as_ptr<const void>(expert_offsets);
  p.offsets_int64 = offsets_int64;
  p.x_grouped = x_grouped;
  p.y_grouped = y_grouped;
  p.fan_out = checked_int(fan_out, "fan_out");
  p.num_experts = checked_int(num_experts, "num_experts");
  p.num_rows = num_rows;
  p.k_in = checked_int(k_in, "k_in");
  p.n_out = checked_int(n_out, "n_out");
  p.glu = checked_int(glu, "glu");
  p.pre = as_ptr<void>(pre);
  p.stride_pm = stride_pm;
  p.pre_rows = pre_rows;
  p.num_ctas = checked_int(num_ctas, "num_ctas");
  p.w_tma = w_tma;
  p.device = checked_int(device, "device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release release;
  return kernel_switch(dtype, w_k_major, [&](auto tag, auto k_major) {
    return scattermoe::scatter_gemm_sm90<decltype(tag), decltype(k_major)::value>(p, s);
  });
}

// Host-only: mismatches between where the scatter GEMM's TMA boxes put W and where its mainloop reads it.
int scatter_gemm_w_tma_layout_mismatches(const std::string& dtype, bool w_k_major) {
  return kernel_switch(dtype, w_k_major, [&](auto tag, auto k_major) {
    return scattermoe::scatter_gemm_w_tma_layout_mismatches<decltype(tag), decltype(k_major)::value>();
  });
}

void group_bwd_w(const std::string& dtype, uintptr_t x, int64_t stride_xm, int64_t x_rows, uintptr_t dy,
                 int64_t stride_dym, int64_t dy_rows, uintptr_t dw, int64_t stride_dwe, int64_t stride_dwk,
                 int64_t stride_dwn, uintptr_t sorted_scattered_idxs, uintptr_t expert_offsets, bool offsets_int64,
                 bool x_grouped, bool dy_grouped, int64_t x_fan_out, int64_t dy_fan_out, int64_t num_experts,
                 int64_t num_rows, int64_t k_in, int64_t n_out, int64_t device, uintptr_t stream,
                 uintptr_t row_scale, uintptr_t db, int64_t stride_dbe, uintptr_t expert_order) {
  GroupBwdWParams p;
  p.x = as_ptr<const void>(x);
  p.stride_xm = stride_xm;
  p.x_rows = x_rows;
  p.dy = as_ptr<const void>(dy);
  p.stride_dym = stride_dym;
  p.dy_rows = dy_rows;
  p.dw = as_ptr<void>(dw);
  p.stride_dwe = stride_dwe;
  p.stride_dwk = stride_dwk;
  p.stride_dwn = stride_dwn;
  p.sorted_scattered_idxs = as_ptr<const int64_t>(sorted_scattered_idxs);
  p.row_scale = as_ptr<const float>(row_scale);
  p.db = as_ptr<void>(db);
  p.stride_dbe = stride_dbe;
  p.expert_offsets = as_ptr<const void>(expert_offsets);
  p.expert_order = as_ptr<const int32_t>(expert_order);
  p.offsets_int64 = offsets_int64;
  p.x_grouped = x_grouped;
  p.dy_grouped = dy_grouped;
  p.x_fan_out = checked_int(x_fan_out, "x_fan_out");
  p.dy_fan_out = checked_int(dy_fan_out, "dy_fan_out");
  p.num_experts = checked_int(num_experts, "num_experts");
  p.num_rows = num_rows;
  p.k_in = checked_int(k_in, "k_in");
  p.n_out = checked_int(n_out, "n_out");
  p.device = checked_int(device, "device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release release;
  dtype_switch(dtype, [&](auto tag) {
    scattermoe::group_bwd_w_sm90<decltype(tag)>(p, s);
    return 0;
  });
}

// The scatter GEMM's launch order, computed by the same inline functions the kernel uses (host-only).
py::list scatter_gemm_tile_order(int64_t num_rows, int64_t num_experts, int64_t n_out, int64_t glu) {
  SMOE_CHECK(num_rows >= 0 && num_rows < (int64_t(1) << 24), "num_rows: expected in [0, 2^24), got ", num_rows);
  const int row_tiles = scattermoe::scatter_gemm_row_tiles(num_rows, checked_int(num_experts, "num_experts"));
  const int col_tiles = scattermoe::scatter_gemm_col_tiles(checked_int(n_out, "n_out"), checked_int(glu, "glu"));
  SMOE_CHECK(static_cast<int64_t>(row_tiles) * col_tiles <= (int64_t(1) << 24), "n_out: too many tiles to list");
  py::list order;
  for (int pid = 0; pid < row_tiles * col_tiles; ++pid) {
    int row_tile, col_tile;
    scattermoe::scatter_gemm_tile_of(pid, row_tiles, col_tiles, row_tile, col_tile);
    order.append(py::make_tuple(row_tile, col_tile));
  }
  return order;
}

void glu_backward(const std::string& dtype, uintptr_t pre, int64_t stride_pm, uintptr_t dg, int64_t stride_dgm,
                  uintptr_t scale, uintptr_t dh, int64_t stride_dhm, uintptr_t g, int64_t stride_gm, uintptr_t dot,
                  int64_t num_rows, int64_t f, bool activate_first, int64_t device, uintptr_t stream) {
  GluBackwardParams p;
  p.pre = as_ptr<const void>(pre);
  p.stride_pm = stride_pm;
  p.dg = as_ptr<const void>(dg);
  p.stride_dgm = stride_dgm;
  p.scale = as_ptr<const float>(scale);
  p.dh = as_ptr<void>(dh);
  p.stride_dhm = stride_dhm;
  p.g = as_ptr<void>(g);
  p.stride_gm = stride_gm;
  p.dot = as_ptr<float>(dot);
  p.num_rows = num_rows;
  p.f = checked_int(f, "f");
  p.activate_first = activate_first;
  p.device = checked_int(device, "device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release release;
  dtype_switch(dtype, [&](auto tag) {
    scattermoe::glu_backward_sm90<decltype(tag)>(p, s);
    return 0;
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "scattermoe csrc kernels (sm_90a, CUTLASS), torch-free: device pointers, shapes, strides and "
            "streams are passed as ints. See csrc/README.md.";
  py::register_exception<scattermoe::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def("cuda_probe", &cuda_probe,
        "Never raises: {'error', 'error_name', 'error_string', 'device_count', 'driver_version', "
        "'runtime_version'} from cudaGetDeviceCount / cudaDriverGetVersion.");
  m.def("device_capability", &device_capability, py::arg("device"), "(major, minor) of a CUDA device.");
  m.def("multiprocessor_count", &multiprocessor_count, py::arg("device"));
  m.def("build_info", &build_info, "Versions and configuration this module was compiled with.");
  m.def("grouped_gemm_workspace_bytes", &grouped_gemm_workspace_bytes, py::arg("dtype"), py::arg("w_k_major"),
        py::arg("num_experts"), py::arg("sm_count"),
        "Device workspace (bytes, to be 256-byte aligned) that grouped_gemm needs. Host-only, no CUDA call.");
  m.def("grouped_gemm", &grouped_gemm, py::arg("dtype"), py::arg("w_k_major"), py::arg("x"), py::arg("stride_xm"),
        py::arg("w"), py::arg("stride_we"), py::arg("stride_w_ld"), py::arg("bias"), py::arg("stride_be"),
        py::arg("y"), py::arg("stride_ym"), py::arg("expert_offsets"), py::arg("offsets_int64"),
        py::arg("num_experts"), py::arg("num_rows"), py::arg("k_in"), py::arg("n_out"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("device"), py::arg("sm_count"), py::arg("stream"),
        "Y[rows of e] = X[rows of e] @ W[e] (+ bias[e]) for every expert e, rows grouped by expert, "
        "sizes from expert_offsets on the device (csrc/include/scattermoe/grouped_gemm.h has the layouts). "
        "Enqueued on `stream`; no host sync.");
  m.def("scatter_gemm", &scatter_gemm, py::arg("dtype"), py::arg("w_k_major"), py::arg("x"), py::arg("stride_xm"),
        py::arg("x_rows"), py::arg("w"), py::arg("stride_we"), py::arg("stride_w_ld"), py::arg("bias"),
        py::arg("stride_be"), py::arg("y"), py::arg("stride_ym"), py::arg("y_rows"), py::arg("gates"),
        py::arg("sorted_scattered_idxs"), py::arg("expert_offsets"), py::arg("offsets_int64"), py::arg("x_grouped"),
        py::arg("y_grouped"), py::arg("fan_out"), py::arg("num_experts"), py::arg("num_rows"), py::arg("k_in"),
        py::arg("n_out"), py::arg("glu") = 0, py::arg("pre") = 0, py::arg("stride_pm") = 0,
        py::arg("pre_rows") = 0, py::arg("num_ctas") = 0, py::arg("w_tma") = false, py::arg("device"),
        py::arg("stream"),
        "scatter2scatter on sm_90a: rows gathered on load (x_grouped=False: token slot // fan_out), scattered on "
        "store (y_grouped=False: slot), per-expert bias, the GLU epilogue (glu=1: silu(a) * b, 2: a * silu(b), "
        "W and bias 2 * n_out wide; pre, if not 0, pre_rows rows, receives both halves before it), float32 gates "
        "by slot "
        "(csrc/include/scattermoe/scatter_gemm.h has the layouts); num_ctas > 0: the persistent kernel on that many "
        "CTAs (the SM count), 0: one CTA per tile; w_tma: W loaded by TMA where a tensor map can describe it, "
        "else by cp.async. Returns whether W was loaded by TMA. Enqueued on `stream`; no host sync.");
  m.def("group_bwd_w", &group_bwd_w, py::arg("dtype"), py::arg("x"), py::arg("stride_xm"), py::arg("x_rows"),
        py::arg("dy"), py::arg("stride_dym"), py::arg("dy_rows"), py::arg("dw"), py::arg("stride_dwe"),
        py::arg("stride_dwk"), py::arg("stride_dwn"), py::arg("sorted_scattered_idxs"), py::arg("expert_offsets"),
        py::arg("offsets_int64"), py::arg("x_grouped"), py::arg("dy_grouped"), py::arg("x_fan_out"),
        py::arg("dy_fan_out"), py::arg("num_experts"), py::arg("num_rows"), py::arg("k_in"), py::arg("n_out"),
        py::arg("device"), py::arg("stream"), py::arg("row_scale") = 0, py::arg("db") = 0, py::arg("stride_dbe") = 0,
        py::arg("expert_order") = 0,
        "dW[e] = X_e^T dY_e for every expert (rows gathered on load: slot // fan_out unless grouped; an empty "
        "expert gets zeros; dY rows scaled by the float32 row_scale[slot] if given; db[e] = the column sums "
        "of the scaled dY_e if db is given; expert_order, if not 0, an int32 [E] permutation: the experts in "
        "launch order); "
        "csrc/include/scattermoe/group_bwd_w.h has the layouts. Enqueued on `stream`.");
  m.def("scatter_gemm_tile_order", &scatter_gemm_tile_order, py::arg("num_rows"), py::arg("num_experts"),
        py::arg("n_out"), py::arg("glu") = 0,
        "[(row_tile, col_tile)] of the scatter GEMM's CTAs in launch order (grouped raster). Host-only.");
  m.def("scatter_gemm_w_tma_layout_mismatches", &scatter_gemm_w_tma_layout_mismatches, py::arg("dtype"),
        py::arg("w_k_major"),
        "Elements of a stage's W tile that the scatter GEMM's TMA boxes (128-byte swizzle) would put elsewhere "
        "than its mainloop's shared-memory layout has them, over both kernels' stages: 0 when right. Host-only.");
  m.def("glu_backward", &glu_backward, py::arg("dtype"), py::arg("pre"), py::arg("stride_pm"), py::arg("dg"),
        py::arg("stride_dgm"), py::arg("scale"), py::arg("dh"), py::arg("stride_dhm"), py::arg("g"),
        py::arg("stride_gm"), py::arg("dot"), py::arg("num_rows"), py::arg("f"), py::arg("activate_first"),
        py::arg("device"), py::arg("stream"),
        "dH = GLU'(H) * (s dG), optionally s * GLU(H) and <dG, GLU(H)> per row, in one pass "
        "(csrc/include/scattermoe/glu_backward.h). Enqueued on `stream`.");
}
