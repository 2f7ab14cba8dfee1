// cpet/core/core.hpp — umbrella header of the core room.
#pragma once

#include "cpet/core/bf16.hpp"
#include "cpet/core/buffer.hpp"
#include "cpet/core/eigen.hpp"
#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"
