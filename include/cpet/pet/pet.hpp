// cpet/pet/pet.hpp — umbrella header of the pet room.
#pragma once

#include "cpet/pet/none.hpp"
#include "cpet/pet/policy.hpp"
