// cpet/compress/compress.hpp — umbrella header of the compress room.
#pragma once

#include "cpet/compress/calibration.hpp"
#include "cpet/compress/dense.hpp"
#include "cpet/compress/format.hpp"
#include "cpet/compress/policy.hpp"
#include "cpet/compress/prune.hpp"
#include "cpet/compress/quantize.hpp"
#include "cpet/compress/quantized.hpp"
#include "cpet/compress/structured.hpp"
