// Prompt-embedding cache index (DESIGN.md §3): filled in by the cache component.
#include <torch/extension.h>

void init_embedding_cache(pybind11::module_& m) { (void)m; }
