// Input checks and CUDA status checks shared by every translation unit of scattermoe._C.
//
// Bad arguments throw std::invalid_argument (pybind11 turns it into ValueError);
// a failed CUDA runtime call throws scattermoe::CudaError naming the call, which
// the bindings register as scattermoe._C.CudaError (a RuntimeError subclass).
// No function here may abort the process: a CPU machine without a driver must
// get a clean Python exception from every entry point (DESIGN.md section 3b).
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace scattermoe {

struct CudaError : std::runtime_error {
  int code;
  CudaError(const std::string& message, int code_) : std::runtime_error(message), code(code_) {}
};

// Errors a kernel's fault leaves on the context: every later call reports them, whichever call it is.
inline bool is_sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchFailure: case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress: case cudaErrorHardwareStackError: case cudaErrorAssert:
    case cudaErrorInvalidPc: case cudaErrorInvalidAddressSpace: case cudaErrorLaunchTimeout:
      return true;
    default:
      return false;
  }
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  std::ostringstream os;
  os << call << " failed: " << cudaGetErrorName(err) << " (CUDA error " << static_cast<int>(err)
     << "): " << cudaGetErrorString(err) << " [" << file << ":" << line << "]";
  if (is_sticky(err))
    os << "; this error outlives the kernel that caused it, so it may come from an earlier kernel on this device,"
          " not from this call (CUDA_LAUNCH_BLOCKING=1 reports it at the kernel that faulted)";
  throw CudaError(os.str(), static_cast<int>(err));
}

template <class... Parts>
[[noreturn]] void throw_invalid_argument(const char* file, int line, const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  os << " [" << file << ":" << line << "]";
  throw std::invalid_argument(os.str());
}

}  // namespace scattermoe

// SMOE_CUDA_CHECK(cudaFoo(...)): throw CudaError("cudaFoo(...) failed: cudaErrorX (CUDA error N): ...").
#define SMOE_CUDA_CHECK(call)                                                         \
  do {                                                                                \
    cudaError_t smoe_err_ = (call);                                                   \
    if (smoe_err_ != cudaSuccess) ::scattermoe::throw_cuda_error(smoe_err_, #call, __FILE__, __LINE__); \
  } while (0)

// SMOE_CHECK(cond, "x: expected ...", value): throw ValueError with the streamed message.
#define SMOE_CHECK(cond, ...)                                                         \
  do {                                                                                \
    if (!(cond)) ::scattermoe::throw_invalid_argument(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

// After a <<<...>>> launch: launch-configuration errors surface here, named by the kernel.
#define SMOE_CHECK_LAUNCH(kernel_name)                                                \
  do {                                                                                \
    cudaError_t smoe_err_ = cudaGetLastError();                                       \
    if (smoe_err_ != cudaSuccess)                                                     \
      ::scattermoe::throw_cuda_error(smoe_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)

namespace scattermoe {

// Restores the caller's current device: this module's static cudart keeps its own notion of it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SMOE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) SMOE_CUDA_CHECK(cudaSetDevice(device));
  }
  // Unchecked on purpose: a destructor must not throw, and the device was valid on entry.
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace scattermoe
