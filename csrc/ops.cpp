// The root of the instructrl_fast operator library.
//
// Every op's schema lives beside its kernels in its own file (csrc/<op>.cpp) inside a
// TORCH_LIBRARY_FRAGMENT(instructrl_fast, m) block, with its CPU kernels registered by
// TORCH_LIBRARY_IMPL(instructrl_fast, CPU, m). CUDA kernels live in csrc/cuda/ and are built into the
// separate extension instructrl_fast._C_cuda. Autograd and fake (meta) implementations are registered
// from Python (instructrl_fast/ops/), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The module is loaded only for its side effect of registering the ops; it exposes no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

static std::string build_tag() {
#ifdef _OPENMP
  return "cpp+openmp";
#else
  return "cpp";
#endif
}

TORCH_LIBRARY(instructrl_fast, m) {
  // A trivial op so the library is never empty and the build can be smoke-tested from Python.
  m.def("build_tag() -> str", &build_tag);
}
