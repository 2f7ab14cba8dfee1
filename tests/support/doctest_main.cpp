// tests/support/doctest_main.cpp — the main() of every cpet test binary: doctest's, plus what CTest needs so
// that every test case runs under CTest exactly once and a run that executes nothing cannot pass.
//
//   --cpet-ctest-file=F
//       Writes F, a CTest script with one entry per test case (run by the build right after linking; see
//       tests/CMakeLists.txt). A binary may hold the files of a whole room (tests/<room>/test_<name>.cpp); each
//       case is named and labelled after its own file, "<room>/<name>/<case>", label <room>. doctest's stock
//       discovery hands names to CMake lists, so a name with ';' became two entries whose filters matched
//       nothing, and ',' separates doctest filters. Here each entry's filters are the case's file
//       (--source-file=*/<room>/test_<name>.cpp) and its name with every character that a CMake list or a doctest
//       filter list would read specially replaced by '?' (doctest's one-character wildcard); doctest's own matcher
//       checks, before F is written, that the pair selects exactly one case of this binary. Any ambiguity fails the
//       build, naming the cases.
//   --cpet-list-ids
//       Prints each case's ledger id (below), one a line.
//   CPET_TEST_LEDGER=FILE (environment)
//       Appends "<binary> <id>" to FILE for every case this run executes; tests/support/check_ledger.cmake
//       compares the ledger of a whole CTest run against --cpet-list-ids of every binary.
// A run (not a listing) that executes zero test cases exits 1: a CTest entry whose filter matches nothing fails.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits.h>
#include <string>
#include <string_view>
#include <vector>

namespace {

unsigned g_cases_started = 0;

std::string self_path() {
    char buf[PATH_MAX];
    const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) return {};
    return std::string(buf, static_cast<std::size_t>(n));
}

std::string base_name(const std::string& p) {
    const auto slash = p.find_last_of('/');
    return slash == std::string::npos ? p : p.substr(slash + 1);
}

/// Where a case comes from: tests/<room>/test_<name>.cpp gives room and name (the binary may hold several files).
struct case_origin {
    std::string room, name;
};
case_origin origin_of(const doctest::TestCaseData& tc) {
    const std::string file(tc.m_file.c_str());
    const auto slash = file.find_last_of('/');
    const auto up = slash == std::string::npos || slash == 0 ? std::string::npos : file.find_last_of('/', slash - 1);
    std::string stem = file.substr(slash == std::string::npos ? 0 : slash + 1);
    if (stem.ends_with(".cpp")) stem.resize(stem.size() - 4);
    if (stem.starts_with("test_")) stem.erase(0, 5);
    std::string room = slash == std::string::npos ? std::string() : file.substr(up + 1, slash - up - 1);
    return {room, stem};
}

/// The CTest prefix of a case: "<room>/<name>/".
std::string prefix_of(const doctest::TestCaseData& tc) {
    const auto o = origin_of(tc);
    return o.room + "/" + o.name + "/";
}

/// The source-file filter of a case: its own file, whatever directory the tree sits in.
std::string file_filter_of(const doctest::TestCaseData& tc) {
    const auto o = origin_of(tc);
    return "*/" + o.room + "/test_" + o.name + ".cpp";
}

/// A name as a ledger id: one token a CMake list keeps whole (no ';', '[', ']', '\\', no newline or tab).
std::string ledger_id(std::string_view name) {
    std::string id(name);
    for (char& c : id)
        if (c == ';' || c == '[' || c == ']' || c == '\\' || c == '\n' || c == '\t' || c == '"' || c == '$') c = '_';
    return id;
}

/// The filter of one case: characters that CMake lists or doctest filter lists treat specially become '?'.
std::string filter_of(std::string_view name) {
    std::string f(name);
    for (char& c : f)
        if (c == ',' || c == ';' || c == '\\' || c == '[' || c == ']' || c == '"' || c == '$' || c == '\n') c = '?';
    return f;
}

/// The CTest entry's display name: the name with ';' (a CMake list separator) shown as ','.
std::string display_of(std::string_view prefix, std::string_view name) {
    std::string d(prefix);
    d += name;
    for (char& c : d)
        if (c == ';') c = ',';
    return d;
}

/// A CMake bracket argument holding s: [==[s]==] with enough '=' that s cannot close it early.
std::string bracket(const std::string& s) {
    std::string eq = "=";
    while (s.find("]" + eq + "]") != std::string::npos) eq += "=";
    return "[" + eq + "[" + s + "]" + eq + "]";
}

struct ledger_listener : doctest::IReporter {
    explicit ledger_listener(const doctest::ContextOptions&) {}
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats&) override {}
    void test_case_start(const doctest::TestCaseData& tc) override {
        ++g_cases_started;
        const char* path = std::getenv("CPET_TEST_LEDGER");
        if (!path || !*path) return;
        const std::string line = base_name(self_path()) + " " + ledger_id(prefix_of(tc) + tc.m_name) + "\n";
        // O_APPEND: CTest runs several binaries at once; one short write() per case keeps lines whole.
        const int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0) {
            std::fprintf(stderr, "cpet: cannot open the test ledger %s\n", path);
            std::exit(2);
        }
        const ssize_t w = ::write(fd, line.data(), line.size());
        ::close(fd);
        if (w != static_cast<ssize_t>(line.size())) {
            std::fprintf(stderr, "cpet: cannot write the test ledger %s\n", path);
            std::exit(2);
        }
    }
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("cpet_ledger", 1, ledger_listener);

std::vector<const doctest::detail::TestCase*> all_cases() {
    std::vector<const doctest::detail::TestCase*> out;
    for (const auto& tc : doctest::detail::getRegisteredTests()) out.push_back(&tc);
    return out;
}

int write_ctest_file(const std::string& file) {
    const auto cases = all_cases();
    if (cases.empty()) {
        std::fprintf(stderr, "cpet: %s registers no test case\n", self_path().c_str());
        return 1;
    }
    // Each pair of filters must select its own case and no other (doctest matches case-insensitively by default).
    bool ok = true;
    for (const auto* tc : cases) {
        const std::string f = filter_of(tc->m_name);
        const std::string sf = file_filter_of(*tc);
        std::vector<std::string> hits;
        for (const auto* other : cases)
            if (doctest::wildcmp(other->m_file.c_str(), sf.c_str(), false) &&
                doctest::wildcmp(other->m_name, f.c_str(), false))
                hits.emplace_back(other->m_name);
        if (hits.size() != 1) {
            ok = false;
            std::fprintf(stderr, "cpet: the CTest filter of test case \"%s\" selects %zu cases:\n", tc->m_name,
                         hits.size());
            for (const auto& h : hits) std::fprintf(stderr, "  \"%s\"\n", h.c_str());
        }
    }
    std::vector<std::string> seen;
    for (const auto* tc : cases) {
        const std::string d = display_of(prefix_of(*tc), tc->m_name);
        for (const auto& s : seen)
            if (s == d) {
                ok = false;
                std::fprintf(stderr, "cpet: two test cases share the CTest name \"%s\"\n", d.c_str());
            }
        seen.push_back(d);
    }
    if (!ok) {
        std::fprintf(stderr, "cpet: rename the test cases above so that each has a name of its own\n");
        return 1;
    }
    const std::string exe = self_path();
    std::string dir = exe.substr(0, exe.find_last_of('/'));
    std::string script;
    for (const auto* tc : cases) {
        const std::string d = bracket(display_of(prefix_of(*tc), tc->m_name));
        script += "add_test(" + d + " " + bracket(exe) + " " + bracket("--source-file=" + file_filter_of(*tc)) + " " +
                  bracket("--test-case=" + filter_of(tc->m_name)) + ")\n";
        script += "set_tests_properties(" + d + " PROPERTIES LABELS " + bracket(origin_of(*tc).room) +
                  " WORKING_DIRECTORY " + bracket(dir) + ")\n";
    }
    const std::string tmp = file + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out << script;
        if (!out) {
            std::fprintf(stderr, "cpet: cannot write %s\n", tmp.c_str());
            return 1;
        }
    }
    if (std::rename(tmp.c_str(), file.c_str()) != 0) {
        std::fprintf(stderr, "cpet: cannot rename %s to %s\n", tmp.c_str(), file.c_str());
        return 1;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    std::string ctest_file;
    bool list_ids = false;
    std::vector<char*> rest;
    for (int i = 0; i < argc; ++i) {
        const std::string_view a(argv[i]);
        auto value = [&](std::string_view opt, std::string& out) {
            if (!a.starts_with(opt)) return false;
            out = std::string(a.substr(opt.size()));
            return true;
        };
        if (i > 0 && value("--cpet-ctest-file=", ctest_file)) continue;
        if (i > 0 && a == "--cpet-list-ids") {
            list_ids = true;
            continue;
        }
        rest.push_back(argv[i]);
    }
    if (!ctest_file.empty()) return write_ctest_file(ctest_file);
    if (list_ids) {
        for (const auto* tc : all_cases()) std::cout << ledger_id(prefix_of(*tc) + tc->m_name) << '\n';
        return 0;
    }

    doctest::Context context;
    context.applyCommandLine(static_cast<int>(rest.size()), rest.data());
    const int res = context.run();
    if (context.shouldExit()) return res;  // --list-test-cases, --help, --count ...: nothing was meant to run
    if (g_cases_started == 0) {
        std::fprintf(stderr,
                     "cpet: this run executed no test case (its filters matched none); a run that tests nothing "
                     "fails\n");
        return 1;
    }
    return res;
}
