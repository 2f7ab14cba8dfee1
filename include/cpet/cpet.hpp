// cpet/cpet.hpp — the umbrella header: every CPU room of the library (not cuda/).
#pragma once

#include "cpet/core/core.hpp"
#include "cpet/arch/dispatch.hpp"
#include "cpet/kernels/kernels.hpp"
#include "cpet/compress/compress.hpp"
#include "cpet/pet/pet.hpp"
#include "cpet/nn/nn.hpp"
#include "cpet/serve/serve.hpp"
#include "cpet/train/train.hpp"
#include "cpet/strategy/strategy.hpp"
