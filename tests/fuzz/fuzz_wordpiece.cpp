// tests/fuzz/fuzz_wordpiece.cpp — the WordPiece tokenizer on arbitrary bytes (invalid UTF-8 included) with the
// committed bert-base-uncased vocabulary: never crashes, every id is in the vocabulary, encode() respects
// max_length and frames the ids with [CLS] / [SEP].
#include <string_view>

#include "cpet/io/wordpiece.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace cpet;
    static const auto tok =
        io::wordpiece_tokenizer::from_vocab(cpet::fuzz::source_root() / "tests/reference/bert-uncased-vocab.txt");
    return cpet::fuzz::guarded([&] {
        const std::string_view text(reinterpret_cast<const char*>(data), size);
        for (auto id : tok.tokenize_ids(text))
            if (id < 0 || std::size_t(id) >= tok.vocab_size()) __builtin_trap();
        const auto ids = tok.encode(text, 16);
        if (ids.size() < 2 || ids.size() > 16 || ids.front() != tok.cls_id() || ids.back() != tok.sep_id())
            __builtin_trap();
    });
}
