// Python module stub for instructrl_fast._C_cuda: importing it registers the CUDA kernels of the ops
// (TORCH_LIBRARY_IMPL(instructrl_fast, CUDA, m) blocks in the .cu files of this folder). The schemas
// come from instructrl_fast._C, which is always imported first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
