// Helpers shared by every fastkd kernel file (host code only).
//
// The narrow ATen headers, not <ATen/ATen.h>: the tensor class, dispatch and the few factory functions
// the kernels call. <ATen/ATen.h> (every operator) was most of each translation unit's compile time.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <c10/util/Exception.h>

#define FKD_CHECK(cond, ...) TORCH_CHECK(cond, "fastkd: ", __VA_ARGS__)
#define FKD_CHECK_ARG(cond, arg, ...) TORCH_CHECK_VALUE(cond, "fastkd: argument '", arg, "': ", __VA_ARGS__)

// Dispatch on the three floating dtypes fastkd accepts for logits and gradients.
#define FKD_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
