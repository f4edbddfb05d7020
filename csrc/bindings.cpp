// The one pybind11 module, qwenrl._C. Each component registers its own functions.
#include <torch/extension.h>

void init_efe_loss(pybind11::module_& m);
void init_embedding_cache(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qwenrl C++ kernels: fused EFE loss (CPU) and the prompt-embedding cache";
  init_efe_loss(m);
  init_embedding_cache(m);
}
