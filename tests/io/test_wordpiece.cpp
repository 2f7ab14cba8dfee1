// tests/io/test_wordpiece.cpp — the BERT WordPiece tokenizer token for token against HuggingFace's (tokenizers'
// BertTokenizer, as transformers 5 runs it) on 72 strings: accents, CJK, Hangul, punctuation, specials written in
// the text, controls, odd whitespace, truncation (tests/reference/wordpiece_reference.json, made by
// make_references.py with the bert-base-uncased vocabulary that all-MiniLM-L6-v2 ships, committed beside it).
#include <doctest/doctest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cpet/io/wordpiece.hpp"
#include "io/io_testing.hpp"

namespace cpet_test_io_wordpiece {  // each test file's own namespace: the files of a room compile as one unit

using namespace cpet;

namespace {

const io::wordpiece_tokenizer& tokenizer() {
    static const auto t = io::wordpiece_tokenizer::from_vocab(testing::reference_dir() / "bert-uncased-vocab.txt");
    return t;
}

nlohmann::json reference() {
    std::ifstream in(testing::reference_dir() / "wordpiece_reference.json");
    return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("wordpiece: every reference string gives HF's ids, untruncated and truncated to 32") {
    const auto& tok = tokenizer();
    CHECK(tok.vocab_size() == 30522);
    CHECK(tok.cls_id() == 101);
    CHECK(tok.sep_id() == 102);
    CHECK(tok.pad_id() == 0);
    const auto ref = reference();
    int n = 0;
    for (const auto& c : ref["cases"]) {
        const std::string text = c["text"].get<std::string>();
        CAPTURE(text);
        CHECK(tok.encode(text, 100000) == c["ids"].get<std::vector<std::int32_t>>());
        CHECK(tok.encode(text, 32) == c["ids_max32"].get<std::vector<std::int32_t>>());
        ++n;
    }
    CHECK(n >= 70);
}

TEST_CASE("wordpiece: sentence pairs give HF's ids and token types, cut longest-first to 24") {
    const auto& tok = tokenizer();
    const auto ref = reference();
    int n = 0;
    for (const auto& c : ref["pairs"]) {
        const auto a = c["a"].get<std::string>(), b = c["b"].get<std::string>();
        CAPTURE(a);
        CAPTURE(b);
        const auto [ids, types] = tok.encode_pair(a, b, 24);
        CHECK(ids == c["ids_max24"].get<std::vector<std::int32_t>>());
        CHECK(types == c["type_ids_max24"].get<std::vector<std::int32_t>>());
        ++n;
    }
    CHECK(n >= 20);
    CHECK_THROWS_WITH_AS((void)tok.encode_pair("a", "b", 2), doctest::Contains("no room"), shape_error);
}

TEST_CASE("wordpiece: pieces, batches and bad input") {
    const auto& tok = tokenizer();
    CHECK(tok.tokenize("Unaffable!") == std::vector<std::string>{"una", "##ffa", "##ble", "!"});
    CHECK(tok.tokenize("Crème BRÛLÉE") == tok.tokenize("creme brulee"));  // accents stripped, lower-cased
    CHECK(tok.tokenize("").empty());
    // Invalid UTF-8 decodes to U+FFFD, which cleaning drops (a truncated sequence, an overlong, a stray byte).
    CHECK(tok.tokenize("ab\xc3") == tok.tokenize("ab"));
    CHECK(tok.tokenize("a\xc0\xafz") == tok.tokenize("az"));
    CHECK(tok.tokenize("\xff" "cat") == tok.tokenize("cat"));
    // A word longer than 100 characters is one [UNK].
    CHECK(tok.tokenize(std::string(101, 'a')) == std::vector<std::string>{"[UNK]"});
    const std::vector<std::string> texts{"hello world", "a", "the quick brown fox"};
    const auto b = tok.encode_batch(texts);
    CHECK(b.seq_len == 6);
    CHECK(b.lengths == std::vector<index_t>{4, 3, 6});
    CHECK(b.ids[3] == tok.sep_id());
    CHECK(b.ids[4] == tok.pad_id());
    CHECK(b.ids[6] == tok.cls_id());
    CHECK_THROWS_WITH_AS((void)tok.encode("x", 1), doctest::Contains("no room for [CLS] and [SEP]"), shape_error);
    CHECK_THROWS_WITH_AS((void)tok.token(30522), doctest::Contains("outside the vocabulary"), shape_error);
    CHECK_THROWS_WITH_AS(io::wordpiece_tokenizer::from_vocab(testing::reference_dir() / "nope.txt"),
                         doctest::Contains("nope.txt: cannot open"), io_error);
    CHECK_THROWS_WITH_AS(io::wordpiece_tokenizer::from_vocab(testing::reference_dir() / "tiny-bert" / "config.json"),
                         doctest::Contains("config.json: the vocabulary has no [UNK] token"), io_error);
}

}  // namespace cpet_test_io_wordpiece
