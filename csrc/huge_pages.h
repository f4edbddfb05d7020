// Large uninitialised buffers backed by transparent huge pages (csrc/huge_pages.cpp).
#pragma once

#include <ATen/core/Tensor.h>

// An uninitialised [sizes] buffer for a fused gradient. A fresh buffer of hundreds of MB (an LLM
// vocabulary's logits) is page-faulted in 4 KiB at a time as the kernel first writes it, which
// can cost more than the kernel; backed by transparent huge pages (2 MiB) it costs a fraction.
at::Tensor empty_grad(at::IntArrayRef sizes, at::ScalarType dtype);
