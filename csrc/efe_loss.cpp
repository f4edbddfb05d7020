#include <torch/extension.h>
void init_efe_loss(pybind11::module_& m) { (void)m; }
