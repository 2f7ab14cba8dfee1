// cpet/io/wordpiece.hpp — the BERT WordPiece tokenizer from a checkpoint's vocab.txt, as HuggingFace tokenizers
// runs it (BertTokenizer in transformers 5 is tokenizers' BertNormalizer + BertPreTokenizer + WordPiece +
// the [CLS] … [SEP] template), checked token for token against it in tests/io/test_wordpiece.cpp.
//
//   0. special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) written literally in the text are matched first, on the
//      raw text, and become their ids;
//   1. clean:   drop U+0000, U+FFFD and controls (categories Cc Cf Co Cs, except \t \n \r); every White_Space
//               character becomes ' ';
//   2. CJK:     a space either side of each CJK ideograph (the blocks tokenizers lists), so each is a word;
//   3. accents: NFD, then nonspacing marks (Mn) removed (on when lower-casing unless strip_accents says otherwise);
//   4. lower:   Unicode lowercase mapping;
//   5. split:   on whitespace (dropped), then every punctuation character (ASCII punctuation or category P*) is a
//               word of its own;
//   6. WordPiece: greedy longest match from the left, continuations prefixed "##"; a word with no full cover, or of
//               more than 100 characters, is [UNK];
//   7. [CLS] + pieces + [SEP], truncated to max_length (specials included) by dropping pieces from the end.
// Text is UTF-8; an invalid byte sequence decodes to U+FFFD, which step 1 drops.
//
// Where cpet can differ from tokenizers: code points unassigned in Unicode 14 (Python's tables, from which
// unicode_tables.hpp is generated) are kept, while tokenizers' older category tables drop what they do not know
// (category Cn), and characters newer than those tables may be categorised differently. Capital sigma lowercases to
// σ everywhere (no final-form ς rule), as a per-character mapping does.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/io/unicode_tables.hpp"
#include "cpet/nn/model.hpp"

namespace cpet::io {

namespace unicode {

template <std::size_t N>
inline bool in_ranges(const cp_range (&r)[N], char32_t c) noexcept {
    auto it = std::upper_bound(std::begin(r), std::end(r), c, [](char32_t v, const cp_range& x) { return v < x.lo; });
    return it != std::begin(r) && c <= (it - 1)->hi;
}

inline bool is_white_space(char32_t c) noexcept {  // the White_Space property (what Rust's char::is_whitespace tests)
    return (c >= 0x9 && c <= 0xD) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
inline bool is_control(char32_t c) noexcept {
    return c != '\t' && c != '\n' && c != '\r' && in_ranges(other, c);
}
inline bool is_punctuation(char32_t c) noexcept {
    return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126) ||
           (c > 127 && in_ranges(punctuation, c));
}
inline bool is_nonspacing_mark(char32_t c) noexcept { return c >= 0x300 && in_ranges(nonspacing_marks, c); }
inline bool is_cjk(char32_t c) noexcept {
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}
/// Appends lowercase(c) to out.
inline void append_lower(char32_t c, std::u32string& out) {
    if (c < 0x80) {
        out += (c >= 'A' && c <= 'Z') ? char32_t(c + 32) : c;
        return;
    }
    if (c == 0x130) {  // İ → i + combining dot above (SpecialCasing)
        out += U'i';
        out += char32_t(0x307);
        return;
    }
    auto it = std::upper_bound(std::begin(lowercase), std::end(lowercase), c,
                               [](char32_t v, const case_run& r) { return v < r.lo; });
    if (it != std::begin(lowercase)) {
        const case_run& r = *(it - 1);
        if (c <= r.hi && (c - r.lo) % r.stride == 0) {
            out += char32_t(std::int64_t(c) + r.delta);
            return;
        }
    }
    out += c;
}
/// Appends NFD(c) without its nonspacing marks to out.
inline void append_stripped(char32_t c, std::u32string& out) {
    if (c >= 0xAC00 && c <= 0xD7A3) {  // Hangul syllable → L V (T) jamo (Unicode §3.12), none of them Mn
        const char32_t s = c - 0xAC00;
        out += char32_t(0x1100 + s / 588);
        out += char32_t(0x1161 + (s % 588) / 28);
        if (s % 28) out += char32_t(0x11A7 + s % 28);
        return;
    }
    if (c >= 0xC0) {
        auto it = std::lower_bound(std::begin(decompositions), std::end(decompositions), c,
                                   [](const stripped_decomposition& d, char32_t v) { return d.cp < v; });
        if (it != std::end(decompositions) && it->cp == c) {
            for (char32_t t : it->to)
                if (t) out += t;
            return;
        }
    }
    if (!is_nonspacing_mark(c)) out += c;
}

/// UTF-8 → code points; an invalid sequence (overlong, surrogate, truncated, > U+10FFFF) becomes U+FFFD.
inline std::u32string decode_utf8(std::string_view s) {
    std::u32string out;
    out.reserve(s.size());
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const std::size_t n = s.size();
    for (std::size_t i = 0; i < n;) {
        const unsigned c = p[i];
        if (c < 0x80) {
            out += char32_t(c);
            ++i;
            continue;
        }
        std::size_t len = 0;
        char32_t cp = 0, min = 0;
        if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
        std::size_t k = 1;
        for (; len && k < len && i + k < n && (p[i + k] & 0xC0) == 0x80; ++k) cp = (cp << 6) | (p[i + k] & 0x3F);
        if (len == 0 || k != len || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            out += char32_t(0xFFFD);
            i += std::max<std::size_t>(k, 1);
            continue;
        }
        out += cp;
        i += len;
    }
    return out;
}
inline void append_utf8(char32_t c, std::string& out) {
    if (c < 0x80) {
        out += char(c);
    } else if (c < 0x800) {
        out += char(0xC0 | (c >> 6));
        out += char(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        out += char(0xE0 | (c >> 12));
        out += char(0x80 | ((c >> 6) & 0x3F));
        out += char(0x80 | (c & 0x3F));
    } else {
        out += char(0xF0 | (c >> 18));
        out += char(0x80 | ((c >> 12) & 0x3F));
        out += char(0x80 | ((c >> 6) & 0x3F));
        out += char(0x80 | (c & 0x3F));
    }
}

}  // namespace unicode

struct wordpiece_options {
    bool lowercase = true;
    std::optional<bool> strip_accents;  ///< unset: follows `lowercase` (as BERT's tokenizer does)
    bool clean_text = true;
    bool split_cjk = true;
    std::size_t max_chars_per_word = 100;
    index_t max_length = 512;           ///< default truncation of encode(), specials included
};

class wordpiece_tokenizer {
public:
    /// Reads vocab.txt (one token a line, id = line number, trailing whitespace trimmed as tokenizers does).
    static wordpiece_tokenizer from_vocab(const std::filesystem::path& vocab, wordpiece_options o = {}) {
        std::ifstream in(vocab, std::ios::binary);
        if (!in) throw io_error(cpet::detail::concat(vocab.string(), ": cannot open for reading"));
        wordpiece_tokenizer t;
        t.o_ = o;
        t.file_ = vocab.string();
        std::string line;
        std::int32_t id = 0;
        while (std::getline(in, line)) {
            while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
            t.vocab_.insert_or_assign(line, id);
            t.tokens_.push_back(line);
            require<io_error>(id < INT32_MAX, vocab.string(), ": more than 2^31 tokens");
            ++id;
        }
        require<io_error>(!t.tokens_.empty(), vocab.string(), ": the vocabulary is empty");
        auto need = [&](const char* tok) {
            auto it = t.vocab_.find(tok);
            require<io_error>(it != t.vocab_.end(), vocab.string(), ": the vocabulary has no ", tok, " token");
            return it->second;
        };
        t.unk_ = need("[UNK]");
        t.cls_ = need("[CLS]");
        t.sep_ = need("[SEP]");
        t.pad_ = need("[PAD]");
        for (const char* s : {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"})
            if (auto it = t.vocab_.find(s); it != t.vocab_.end()) t.specials_.emplace_back(s, it->second);
        return t;
    }
    /// vocab.txt of a checkpoint folder, with do_lower_case / strip_accents / tokenize_chinese_chars /
    /// model_max_length from its tokenizer_config.json when present.
    static wordpiece_tokenizer from_model_dir(const std::filesystem::path& dir) {
        wordpiece_options o;
        const auto cfg = dir / "tokenizer_config.json";
        if (std::filesystem::exists(cfg)) {
            std::ifstream in(cfg, std::ios::binary);
            nlohmann::json j;
            try {
                j = nlohmann::json::parse(in);
            } catch (const nlohmann::json::exception& e) {
                throw io_error(cpet::detail::concat(cfg.string(), ": not valid JSON: ", e.what()));
            }
            auto flag = [&](const char* k, bool& dst) {
                if (j.contains(k) && !j[k].is_null()) {
                    require<io_error>(j[k].is_boolean(), cfg.string(), ": \"", k, "\" is ", j[k].dump(), ", expected true/false");
                    dst = j[k].get<bool>();
                }
            };
            flag("do_lower_case", o.lowercase);
            flag("tokenize_chinese_chars", o.split_cjk);
            if (j.contains("strip_accents") && !j["strip_accents"].is_null()) {
                bool s = true;
                flag("strip_accents", s);
                o.strip_accents = s;
            }
            if (j.contains("model_max_length") && j["model_max_length"].is_number_integer()) {
                const auto m = j["model_max_length"].get<std::int64_t>();
                if (m >= 2 && m <= 1'000'000) o.max_length = index_t(m);  // HF writes 1e30 for "no limit"
            }
        }
        return from_vocab(dir / "vocab.txt", o);
    }

    std::size_t vocab_size() const noexcept { return tokens_.size(); }
    std::int32_t cls_id() const noexcept { return cls_; }
    std::int32_t sep_id() const noexcept { return sep_; }
    std::int32_t pad_id() const noexcept { return pad_; }
    std::int32_t unk_id() const noexcept { return unk_; }
    const wordpiece_options& options() const noexcept { return o_; }
    std::optional<std::int32_t> id(std::string_view token) const {
        auto it = vocab_.find(std::string(token));
        if (it == vocab_.end()) return std::nullopt;
        return it->second;
    }
    const std::string& token(std::int32_t id) const {
        require<shape_error>(id >= 0 && std::size_t(id) < tokens_.size(), file_, ": token id ", id,
                             " is outside the vocabulary [0, ", tokens_.size(), ")");
        return tokens_[std::size_t(id)];
    }

    /// The ids of `text` without [CLS] / [SEP] and without truncation.
    std::vector<std::int32_t> tokenize_ids(std::string_view text) const {
        std::vector<std::int32_t> ids;
        // 0. literal special tokens, leftmost first (the longest where two start at one place)
        std::size_t at = 0;
        while (at <= text.size()) {
            std::size_t best = std::string_view::npos, best_len = 0;
            std::int32_t best_id = 0;
            for (const auto& [s, sid] : specials_) {
                const auto p = text.find(s, at);
                if (p != std::string_view::npos && (p < best || (p == best && s.size() > best_len)))
                    best = p, best_len = s.size(), best_id = sid;
            }
            const std::size_t end = best == std::string_view::npos ? text.size() : best;
            normal_ids(text.substr(at, end - at), ids);
            if (best == std::string_view::npos) break;
            ids.push_back(best_id);
            at = best + best_len;
        }
        return ids;
    }
    /// The WordPiece strings of `text` (specials as written, no [CLS] / [SEP]).
    std::vector<std::string> tokenize(std::string_view text) const {
        std::vector<std::string> out;
        for (auto i : tokenize_ids(text)) out.push_back(tokens_[std::size_t(i)]);
        return out;
    }
    /// [CLS] + ids + [SEP], keeping at most max_length ids (specials included; default options().max_length).
    std::vector<std::int32_t> encode(std::string_view text, index_t max_length = -1) const {
        if (max_length < 0) max_length = o_.max_length;
        require<shape_error>(max_length >= 2, "wordpiece_tokenizer::encode: max_length ", max_length,
                             " leaves no room for [CLS] and [SEP]");
        auto body = tokenize_ids(text);
        if (index_t(body.size()) > max_length - 2) body.resize(std::size_t(max_length - 2));
        std::vector<std::int32_t> ids;
        ids.reserve(body.size() + 2);
        ids.push_back(cls_);
        ids.insert(ids.end(), body.begin(), body.end());
        ids.push_back(sep_);
        return ids;
    }
    /// A sentence pair: [CLS] a [SEP] b [SEP] with token types 0 … 0 1 … 1, at most max_length ids, cut as
    /// tokenizers' "longest_first" cuts (the shorter side keeps what it can up to half the budget, the longer
    /// side the rest).
    std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>> encode_pair(std::string_view a, std::string_view b,
                                                                                index_t max_length = -1) const {
        if (max_length < 0) max_length = o_.max_length;
        require<shape_error>(max_length >= 3, "wordpiece_tokenizer::encode_pair: max_length ", max_length,
                             " leaves no room for [CLS] and two [SEP]");
        auto ta = tokenize_ids(a), tb = tokenize_ids(b);
        const std::size_t budget = std::size_t(max_length - 3);
        if (ta.size() + tb.size() > budget) {
            std::size_t n1 = ta.size(), n2 = tb.size();
            const bool swap = n1 > n2;
            if (swap) std::swap(n1, n2);
            n2 = n1 > budget ? n1 : std::max(n1, budget - n1);
            if (n1 + n2 > budget) {
                n1 = budget / 2;
                n2 = n1 + budget % 2;
            }
            if (swap) std::swap(n1, n2);
            ta.resize(std::min(ta.size(), n1));
            tb.resize(std::min(tb.size(), n2));
        }
        std::vector<std::int32_t> ids, types;
        ids.reserve(ta.size() + tb.size() + 3);
        ids.push_back(cls_);
        ids.insert(ids.end(), ta.begin(), ta.end());
        ids.push_back(sep_);
        types.assign(ids.size(), 0);
        ids.insert(ids.end(), tb.begin(), tb.end());
        ids.push_back(sep_);
        types.resize(ids.size(), 1);
        return {std::move(ids), std::move(types)};
    }
    /// Encodes each text and pads them with [PAD] to the longest (right padding, as HF), for nn::Model.
    nn::token_batch encode_batch(std::span<const std::string> texts, index_t max_length = -1) const {
        nn::token_batch b;
        std::vector<std::vector<std::int32_t>> all;
        for (const auto& t : texts) {
            all.push_back(encode(t, max_length));
            b.seq_len = std::max(b.seq_len, index_t(all.back().size()));
        }
        b.ids.assign(std::size_t(b.seq_len) * texts.size(), pad_);
        for (std::size_t i = 0; i < all.size(); ++i) {
            std::copy(all[i].begin(), all[i].end(), b.ids.begin() + std::ptrdiff_t(i * std::size_t(b.seq_len)));
            b.lengths.push_back(index_t(all[i].size()));
        }
        return b;
    }

private:
    void normal_ids(std::string_view text, std::vector<std::int32_t>& ids) const {
        using namespace unicode;
        const std::u32string raw = decode_utf8(text);
        std::u32string a;
        a.reserve(raw.size() + 8);
        for (char32_t c : raw) {  // 1 + 2
            if (o_.clean_text) {
                if (c == 0 || c == 0xFFFD || is_control(c)) continue;
                if (is_white_space(c)) c = ' ';
            }
            if (o_.split_cjk && is_cjk(c)) {
                a += U' ';
                a += c;
                a += U' ';
            } else {
                a += c;
            }
        }
        std::u32string b;
        if (o_.strip_accents.value_or(o_.lowercase)) {  // 3
            b.reserve(a.size());
            for (char32_t c : a) append_stripped(c, b);
        } else {
            b = std::move(a);
        }
        std::u32string s;
        if (o_.lowercase) {  // 4
            s.reserve(b.size());
            for (char32_t c : b) append_lower(c, s);
        } else {
            s = std::move(b);
        }
        std::size_t i = 0;  // 5
        while (i < s.size()) {
            if (is_white_space(s[i])) {
                ++i;
                continue;
            }
            if (is_punctuation(s[i])) {
                word(std::u32string_view(s).substr(i, 1), ids);
                ++i;
                continue;
            }
            std::size_t j = i;
            while (j < s.size() && !is_white_space(s[j]) && !is_punctuation(s[j])) ++j;
            word(std::u32string_view(s).substr(i, j - i), ids);
            i = j;
        }
    }
    /// 6: one pre-tokenised word to WordPiece ids.
    void word(std::u32string_view w, std::vector<std::int32_t>& ids) const {
        if (w.size() > o_.max_chars_per_word) {
            ids.push_back(unk_);
            return;
        }
        const std::size_t mark = ids.size();
        std::string piece;
        std::size_t start = 0;
        while (start < w.size()) {
            std::size_t end = w.size();
            std::optional<std::int32_t> found;
            while (end > start) {
                piece.assign(start > 0 ? "##" : "");
                for (std::size_t k = start; k < end; ++k) unicode::append_utf8(w[k], piece);
                if (auto it = vocab_.find(piece); it != vocab_.end()) {
                    found = it->second;
                    break;
                }
                --end;
            }
            if (!found) {
                ids.resize(mark);
                ids.push_back(unk_);
                return;
            }
            ids.push_back(*found);
            start = end;
        }
    }

    wordpiece_options o_;
    std::string file_;
    std::unordered_map<std::string, std::int32_t> vocab_;
    std::vector<std::string> tokens_;
    std::vector<std::pair<std::string, std::int32_t>> specials_;
    std::int32_t unk_ = 0, cls_ = 0, sep_ = 0, pad_ = 0;
};

}  // namespace cpet::io
