// cpet/kernels/kernels.hpp — umbrella header of the kernels room.
#pragma once

#include "cpet/kernels/activations.hpp"
#include "cpet/kernels/attention.hpp"
#include "cpet/kernels/epilogue.hpp"
#include "cpet/kernels/gemm_f32.hpp"
#include "cpet/kernels/gemm_s8.hpp"
#include "cpet/kernels/gemm_sparse.hpp"
#include "cpet/kernels/gemm_wq.hpp"
#include "cpet/kernels/norms.hpp"
#include "cpet/kernels/rope.hpp"
#include "cpet/kernels/softmax.hpp"
