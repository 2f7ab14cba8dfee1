// examples/fortunes_data.hpp — topic classification data from Debian's `fortunes` corpus (apt-get install
// fortunes): each category file holds texts separated by lines of a single '%'. Used by examples/cpet_pipeline.cpp
// and its CTest version (tests/strategy/test_cpet_fortunes.cpp); not part of the library.
//
// A text goes to the held-out 20 % when its FNV-1a hash is 0 mod 5 (fixed by the text alone, so the split never
// depends on the order files are read or on which categories are chosen). Texts found in more than one chosen
// category are dropped (their label would be ambiguous). Batches group texts of similar token length so that a
// batch of 32 pads little; the trainer shuffles the order of the batches.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <cpet/io/wordpiece.hpp>
#include <cpet/strategy/classify.hpp>

namespace fortunes {

namespace fs = std::filesystem;

/// Where Debian installs the corpus.
inline fs::path default_dir() { return "/usr/share/games/fortunes"; }

struct item {
    std::string text;
    std::int32_t label = 0;
};

struct dataset {
    std::vector<std::string> categories;
    std::vector<item> train, test;
};

inline std::uint64_t fnv1a(const std::string& s) {
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

/// The texts of one category file, whitespace runs collapsed to one space.
inline std::vector<std::string> read_category(const fs::path& file) {
    std::ifstream in(file);
    std::vector<std::string> out;
    std::string line, cur;
    auto flush = [&] {
        std::string t;
        bool space = false;
        for (char c : cur) {
            const bool ws = c == ' ' || c == '\n' || c == '\t' || c == '\r';
            if (ws) space = !t.empty();
            else {
                if (space) t += ' ';
                t += c;
                space = false;
            }
        }
        if (!t.empty()) out.push_back(t);
        cur.clear();
    };
    while (std::getline(in, line)) {
        if (line == "%") flush();
        else cur += line + '\n';
    }
    flush();
    return out;
}

/// The chosen categories, at most `per_category` texts each (the first ones of the file after de-duplication),
/// split 80/20 by hash. Throws std::runtime_error naming the file when a category is missing or too small.
inline dataset load(const std::vector<std::string>& categories, std::size_t per_category, const fs::path& dir = default_dir(),
                    std::size_t min_per_category = 140) {
    dataset d;
    d.categories = categories;
    std::map<std::string, int> seen;  // text -> label, -1 when in two categories
    std::vector<std::vector<std::string>> texts;
    for (std::size_t c = 0; c < categories.size(); ++c) {
        const fs::path f = dir / categories[c];
        if (!fs::exists(f))
            throw std::runtime_error("fortunes: " + f.string() + " not found (apt-get install fortunes)");
        texts.push_back(read_category(f));
        for (const auto& t : texts.back()) {
            auto [it, fresh] = seen.emplace(t, int(c));
            if (!fresh && it->second != int(c)) it->second = -1;
        }
    }
    for (std::size_t c = 0; c < categories.size(); ++c) {
        std::size_t kept = 0;
        for (const auto& t : texts[c]) {
            if (kept == per_category) break;
            auto it = seen.find(t);
            if (it->second != int(c)) continue;  // ambiguous, or a duplicate already taken
            it->second = -2;                     // taken
            ++kept;
            (fnv1a(t) % 5 == 0 ? d.test : d.train).push_back({t, std::int32_t(c)});
        }
        if (kept < min_per_category)
            throw std::runtime_error("fortunes: category " + categories[c] + " has " + std::to_string(kept) +
                                     " distinct texts, fewer than " + std::to_string(min_per_category));
    }
    return d;
}

/// Batches of at most `batch` texts of similar token length (ids truncated to max_length).
inline std::vector<cpet::strategy::labelled_batch> batches(const std::vector<item>& items,
                                                           const cpet::io::wordpiece_tokenizer& tok,
                                                           cpet::index_t max_length, std::size_t batch) {
    std::vector<std::vector<std::int32_t>> ids;
    ids.reserve(items.size());
    for (const auto& it : items) ids.push_back(tok.encode(it.text, max_length));
    std::vector<std::size_t> order(items.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ids[a].size() < ids[b].size(); });
    std::vector<cpet::strategy::labelled_batch> out;
    for (std::size_t i = 0; i < order.size(); i += batch) {
        const std::size_t n = std::min(batch, order.size() - i);
        cpet::strategy::labelled_batch lb;
        cpet::index_t S = 0;
        for (std::size_t j = 0; j < n; ++j) S = std::max<cpet::index_t>(S, cpet::index_t(ids[order[i + j]].size()));
        lb.tokens.seq_len = S;
        for (std::size_t j = 0; j < n; ++j) {
            const auto& v = ids[order[i + j]];
            lb.tokens.lengths.push_back(cpet::index_t(v.size()));
            for (cpet::index_t k = 0; k < S; ++k) lb.tokens.ids.push_back(k < cpet::index_t(v.size()) ? v[std::size_t(k)] : 0);
            lb.labels.push_back(items[order[i + j]].label);
        }
        out.push_back(std::move(lb));
    }
    return out;
}

}  // namespace fortunes
