// cpet/pet/pet.hpp — umbrella header of the pet room.
#pragma once

#include "cpet/pet/accounting.hpp"
#include "cpet/pet/adapter.hpp"
#include "cpet/pet/bitfit.hpp"
#include "cpet/pet/ia3.hpp"
#include "cpet/pet/lora.hpp"
#include "cpet/pet/lowrank.hpp"
#include "cpet/pet/none.hpp"
#include "cpet/pet/policy.hpp"
#include "cpet/pet/prefix.hpp"
#include "cpet/pet/prompt.hpp"
#include "cpet/pet/recovery.hpp"
#include "cpet/pet/stack.hpp"
#include "cpet/pet/task.hpp"
