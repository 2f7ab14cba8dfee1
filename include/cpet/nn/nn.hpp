// cpet/nn/nn.hpp — umbrella header of the nn room.
#pragma once

#include "cpet/nn/attention.hpp"
#include "cpet/nn/batch.hpp"
#include "cpet/nn/compress.hpp"
#include "cpet/nn/config.hpp"
#include "cpet/nn/ffn.hpp"
#include "cpet/nn/kv_cache.hpp"
#include "cpet/nn/layer.hpp"
#include "cpet/nn/linear.hpp"
#include "cpet/nn/model.hpp"
#include "cpet/nn/norm.hpp"
#include "cpet/nn/pet_layer.hpp"
#include "cpet/nn/prune.hpp"
#include "cpet/nn/stack.hpp"
#include "cpet/nn/weights.hpp"
#include "cpet/nn/workspace.hpp"
