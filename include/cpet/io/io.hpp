// cpet/io/io.hpp — the io room in one include: safetensors files, HuggingFace checkpoints by name (BERT, LLaMA),
// the BERT WordPiece tokenizer, PEFT adapters, cpet's own task, weight and backbone files.
//
// io/ needs nlohmann/json (Debian: nlohmann-json3-dev) besides cpet's other dependencies, so cpet/cpet.hpp does
// not include it: a program that reads files includes this header (or the one it needs).
#pragma once

#include "cpet/io/backbone_file.hpp"
#include "cpet/io/cpet_format.hpp"
#include "cpet/io/dtype.hpp"
#include "cpet/io/hf_checkpoint.hpp"
#include "cpet/io/mapped_file.hpp"
#include "cpet/io/peft.hpp"
#include "cpet/io/safetensors.hpp"
#include "cpet/io/train_checkpoint.hpp"
#include "cpet/io/wordpiece.hpp"
