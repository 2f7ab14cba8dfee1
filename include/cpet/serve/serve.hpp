// cpet/serve/serve.hpp — umbrella header of the serve room: a registry of tasks over one shared const backbone,
// and the modules of heterogeneous (one task per sequence) batches.
#pragma once

#include "cpet/serve/compact.hpp"
#include "cpet/serve/mixed.hpp"
#include "cpet/serve/registry.hpp"
