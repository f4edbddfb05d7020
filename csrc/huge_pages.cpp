// The huge-page allocator behind qwenrl._C.empty_grad (declared in huge_pages.h).
#include "huge_pages.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstddef>
#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

at::Tensor empty_grad(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  constexpr size_t kHugePage = size_t{2} << 20;
#ifdef __linux__
  if (bytes >= 16 * kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kHugePage, rounded) == 0, "efe_loss: cannot allocate ",
                rounded, " bytes for the gradient");
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: without huge pages it still works
    return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}
