// cpet/strategy/strategy.hpp — the CPET recipes: knowledge inheritance, recovery initialisation, calibration of
// compressed stacks, tuning a classification task with distillation, and the compress → inherit → recover → tune
// pipeline.
#pragma once

#include "cpet/strategy/calibration.hpp"
#include "cpet/strategy/classify.hpp"
#include "cpet/strategy/inherit.hpp"
#include "cpet/strategy/pipeline.hpp"
#include "cpet/strategy/recovery_init.hpp"
