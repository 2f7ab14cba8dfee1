// A fixture, not a header of cpet: the layering check must fail on it (pet/ may not include compress/).
#pragma once

#include "cpet/compress/format.hpp"
