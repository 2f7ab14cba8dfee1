// cpet/train/train.hpp — the training room: backward passes of layers and models w.r.t. PET / recovery modules
// (the backbone frozen), losses, optimizers, schedules, gradient clipping and the training loop.
#pragma once

#include "cpet/train/clip.hpp"
#include "cpet/train/layer.hpp"
#include "cpet/train/loss.hpp"
#include "cpet/train/model.hpp"
#include "cpet/train/optim.hpp"
#include "cpet/train/parameter.hpp"
#include "cpet/train/schedule.hpp"
#include "cpet/train/trainer.hpp"
