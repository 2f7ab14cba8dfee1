// cpet/train/loss.hpp — the losses of PET training and CPET distillation, each returning its value and writing
// d(loss)/d(input) for the backward to start from.
//
//   cross_entropy     torch.nn.functional.cross_entropy (reduction 'mean', ignore_index −100): classification
//                     over [N, C] logits, and token-level over [B·S, V] with next_token_labels().
//   kl_distillation   Hinton's soft-target loss as HF distillation scripts write it:
//                     T² · kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean').
//   mse               torch MSELoss (mean) over the selected rows' hidden values: CPET's distillation term on
//                     the final hidden states of the real tokens (thunlp/CA-LoRA).
//   loss_parts        the named, weighted terms of a total, as the trainer prints them.
//
// Every per-row reduction (log-sum-exp, KL, squared error) runs in double and rows are summed in row order, so a
// value does not depend on the thread count. A loss is returned even when it is NaN or infinite: the caller
// decides (the trainer stops with numeric_error and leaves the parameters as they were). The gradient output may
// be the input itself (computed in place), or a default-constructed view when only the value is wanted.
// `grad_scale` multiplies the gradient only: the weight of the term in a sum, so no second pass is needed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cpet/core/error.hpp"
#include "cpet/core/matrix.hpp"
#include "cpet/core/parallel.hpp"

namespace cpet::train {

/// The label that marks a row as not counted (torch's default ignore_index).
inline constexpr std::int32_t ignore_index = -100;

/// Which rows of an [M, d] operand a loss counts: all, those with a non-zero mask byte, or the real tokens of a
/// padded batch (row b·seq_len + t counts when t < lengths[b]). Views only: the spans must outlive the call.
class row_selection {
public:
    static row_selection all() noexcept { return {}; }
    static row_selection mask(std::span<const std::uint8_t> m) noexcept {
        row_selection s;
        s.mode_ = mode::mask;
        s.mask_ = m;
        return s;
    }
    static row_selection lengths(std::span<const index_t> lengths, index_t seq_len) noexcept {
        row_selection s;
        s.mode_ = mode::lengths;
        s.lengths_ = lengths;
        s.seq_len_ = seq_len;
        return s;
    }

    /// shape_error naming `who` unless this selection fits an operand of `rows` rows.
    void check(index_t rows, const char* who) const {
        if (mode_ == mode::mask) {
            require<shape_error>(static_cast<index_t>(mask_.size()) == rows, who, ": row mask has ", mask_.size(),
                                 " entries for ", rows, " rows");
        } else if (mode_ == mode::lengths) {
            require<shape_error>(seq_len_ >= 0 && static_cast<index_t>(lengths_.size()) * seq_len_ == rows, who,
                                 ": ", lengths_.size(), " sequences of seq_len ", seq_len_, " make ",
                                 static_cast<index_t>(lengths_.size()) * seq_len_, " rows, the operand has ", rows);
            for (std::size_t b = 0; b < lengths_.size(); ++b)
                require<shape_error>(lengths_[b] >= 0 && lengths_[b] <= seq_len_, who, ": lengths[", b, "] = ",
                                     lengths_[b], " is outside [0, ", seq_len_, "]");
        }
    }
    bool selected(index_t r) const noexcept {
        switch (mode_) {
            case mode::all: return true;
            case mode::mask: return mask_[static_cast<std::size_t>(r)] != 0;
            case mode::lengths: return r % seq_len_ < lengths_[static_cast<std::size_t>(r / seq_len_)];
        }
        return true;
    }
    index_t count(index_t rows) const noexcept {
        index_t n = 0;
        for (index_t r = 0; r < rows; ++r) n += selected(r) ? 1 : 0;
        return n;
    }

private:
    enum class mode : std::uint8_t { all, mask, lengths };
    mode mode_ = mode::all;
    std::span<const std::uint8_t> mask_;
    std::span<const index_t> lengths_;
    index_t seq_len_ = 0;
};

namespace detail {

/// A gradient output is wanted unless it is a default (null, empty) view.
template <class T>
bool wants_grad(const MatrixView<T>& g) noexcept {
    return g.data() != nullptr || !g.empty();
}

/// max + log Σ exp(x·inv_t − max), in double (x scaled by inv_t first, like softmax(x / T)).
inline double log_sum_exp(const float* x, index_t n, double inv_t) noexcept {
    double m = -std::numeric_limits<double>::infinity();
    for (index_t j = 0; j < n; ++j) m = std::max(m, static_cast<double>(x[j]) * inv_t);
    if (!std::isfinite(m)) return std::numeric_limits<double>::quiet_NaN();  // all −inf, or an +inf: torch's NaN
    double s = 0;
    for (index_t j = 0; j < n; ++j) s += std::exp(static_cast<double>(x[j]) * inv_t - m);
    return m + std::log(s);
}

/// Σ over rows in order (the thread count never changes a value).
inline double ordered_sum(const std::vector<double>& v) noexcept {
    double s = 0;
    for (const double x : v) s += x;
    return s;
}

}  // namespace detail

/// torch.nn.functional.cross_entropy(logits, labels, ignore_index=−100, reduction='mean'): the mean of
/// −log softmax(logits[r])[labels[r]] over the rows whose label is not −100; d/dlogits = (softmax − onehot)/n on
/// those rows, 0 on ignored ones. When every row is ignored the loss is 0 and the gradient 0 (torch returns NaN:
/// an all-padding micro-batch is legitimate in token-level training and must not stop a run). Labels outside
/// [0, C) other than −100 throw shape_error naming the row and the value.
inline double cross_entropy(ConstMatrixView<float> logits, std::span<const std::int32_t> labels,
                            MatrixView<float> dlogits, double grad_scale = 1.0) {
    const char* who = "cross_entropy";
    check_shape(logits, -1, -1, "cross_entropy: logits");
    const index_t n = logits.rows();
    const index_t c = logits.cols();
    require<shape_error>(static_cast<index_t>(labels.size()) == n, who, ": ", labels.size(), " labels for ", n,
                         " rows of logits");
    require<shape_error>(c > 0 || n == 0, who, ": logits have no classes (", shape_str(logits), ")");
    const bool grad = detail::wants_grad(dlogits);
    if (grad) check_shape(dlogits, n, c, "cross_entropy: dlogits");
    index_t valid = 0;
    for (index_t r = 0; r < n; ++r) {
        const std::int32_t y = labels[static_cast<std::size_t>(r)];
        require<shape_error>(y == ignore_index || (y >= 0 && y < c), who, ": label of row ", r, " is ", y,
                             ", expected a class in [0, ", c, ") or ", ignore_index, " (ignored)");
        valid += y == ignore_index ? 0 : 1;
    }
    if (valid == 0) {
        if (grad)
            for (index_t r = 0; r < n; ++r) std::fill(dlogits.row(r), dlogits.row(r) + c, 0.f);
        return 0.0;
    }
    const double scale = grad_scale / static_cast<double>(valid);
    std::vector<double> row_loss(static_cast<std::size_t>(n), 0.0);
    parallel_for(index_t{0}, n, [&](index_t r) {
        const std::int32_t y = labels[static_cast<std::size_t>(r)];
        const float* z = logits.row(r);
        if (y == ignore_index) {
            if (grad) std::fill(dlogits.row(r), dlogits.row(r) + c, 0.f);
            return;
        }
        const double lse = detail::log_sum_exp(z, c, 1.0);
        row_loss[static_cast<std::size_t>(r)] = lse - static_cast<double>(z[y]);
        if (!grad) return;
        float* d = dlogits.row(r);  // may be z itself: z[j] is read before d[j] is written
        for (index_t j = 0; j < c; ++j)
            d[j] = static_cast<float>((std::exp(static_cast<double>(z[j]) - lse) - (j == y ? 1.0 : 0.0)) * scale);
    });
    return detail::ordered_sum(row_loss) / static_cast<double>(valid);
}

/// Next-token labels of a padded batch of B sequences (ids.size() == B·seq_len, sequence b in rows
/// [b·seq_len, b·seq_len + lengths[b]) ): the label of row b·seq_len + t is ids[b·seq_len + t + 1] while
/// t + 1 < lengths[b], −100 for each sequence's last real token and for padding. The labels of token-level
/// cross-entropy over the [B·seq_len, V] logits of a causal LM (HF's shift of labels by one).
inline std::vector<std::int32_t> next_token_labels(std::span<const std::int32_t> ids, std::span<const index_t> lengths,
                                                   index_t seq_len) {
    const char* who = "next_token_labels";
    require<shape_error>(seq_len >= 0, who, ": seq_len must be >= 0, got ", seq_len);
    require<shape_error>(static_cast<index_t>(ids.size()) == static_cast<index_t>(lengths.size()) * seq_len, who,
                         ": ", ids.size(), " ids, expected ", lengths.size(), " sequences x seq_len ", seq_len, " = ",
                         static_cast<index_t>(lengths.size()) * seq_len);
    std::vector<std::int32_t> out(ids.size(), ignore_index);
    for (std::size_t b = 0; b < lengths.size(); ++b) {
        require<shape_error>(lengths[b] >= 0 && lengths[b] <= seq_len, who, ": lengths[", b, "] = ", lengths[b],
                             " is outside [0, ", seq_len, "]");
        const std::size_t base = b * static_cast<std::size_t>(seq_len);
        for (index_t t = 0; t + 1 < lengths[b]; ++t)
            out[base + static_cast<std::size_t>(t)] = ids[base + static_cast<std::size_t>(t) + 1];
    }
    return out;
}

/// T² · KL(softmax(teacher/T) ‖ softmax(student/T)) summed over the selected rows and divided by their number
/// (kl_div's 'batchmean'); d/dstudent = T · (softmax(student/T) − softmax(teacher/T)) / rows. The teacher gets no
/// gradient. No selected row: 0 and a zero gradient.
inline double kl_distillation(ConstMatrixView<float> student, ConstMatrixView<float> teacher, double temperature,
                              MatrixView<float> dstudent, const row_selection& rows = row_selection::all(),
                              double grad_scale = 1.0) {
    const char* who = "kl_distillation";
    check_shape(student, -1, -1, "kl_distillation: student logits");
    const index_t n = student.rows();
    const index_t c = student.cols();
    check_shape(teacher, n, c, "kl_distillation: teacher logits (the student's shape)");
    require<shape_error>(c > 0 || n == 0, who, ": logits have no classes (", shape_str(student), ")");
    require<shape_error>(temperature > 0 && std::isfinite(temperature), who,
                         ": temperature must be finite and > 0, got ", temperature);
    rows.check(n, who);
    const bool grad = detail::wants_grad(dstudent);
    if (grad) check_shape(dstudent, n, c, "kl_distillation: dstudent");
    const index_t count = rows.count(n);
    const double inv_t = 1.0 / temperature;
    const double gscale = count ? grad_scale * temperature / static_cast<double>(count) : 0.0;
    std::vector<double> row_kl(static_cast<std::size_t>(n), 0.0);
    parallel_for(index_t{0}, n, [&](index_t r) {
        if (!rows.selected(r)) {
            if (grad) std::fill(dstudent.row(r), dstudent.row(r) + c, 0.f);
            return;
        }
        const float* s = student.row(r);
        const float* t = teacher.row(r);
        const double lse_s = detail::log_sum_exp(s, c, inv_t);
        const double lse_t = detail::log_sum_exp(t, c, inv_t);
        double kl = 0;
        float* d = grad ? dstudent.row(r) : nullptr;  // may be s itself: s[j] is read before d[j] is written
        for (index_t j = 0; j < c; ++j) {
            const double log_pt = static_cast<double>(t[j]) * inv_t - lse_t;
            const double log_ps = static_cast<double>(s[j]) * inv_t - lse_s;
            const double pt = std::exp(log_pt);
            if (pt > 0) kl += pt * (log_pt - log_ps);  // xlogy: a zero target contributes 0
            if (d) d[j] = static_cast<float>((std::exp(log_ps) - pt) * gscale);
        }
        row_kl[static_cast<std::size_t>(r)] = kl;
    });
    if (count == 0) return 0.0;
    return temperature * temperature * detail::ordered_sum(row_kl) / static_cast<double>(count);
}

/// Σ (student − teacher)² over the selected rows' d values, divided by (rows · d) (MSELoss 'mean' over the real
/// tokens); d/dstudent = 2 (student − teacher) / (rows · d) on selected rows, 0 elsewhere. No selected row: 0.
inline double mse(ConstMatrixView<float> student, ConstMatrixView<float> teacher, MatrixView<float> dstudent,
                  const row_selection& rows = row_selection::all(), double grad_scale = 1.0) {
    const char* who = "mse";
    check_shape(student, -1, -1, "mse: student");
    const index_t n = student.rows();
    const index_t c = student.cols();
    check_shape(teacher, n, c, "mse: teacher (the student's shape)");
    rows.check(n, who);
    const bool grad = detail::wants_grad(dstudent);
    if (grad) check_shape(dstudent, n, c, "mse: dstudent");
    const index_t count = rows.count(n);
    const double denom = static_cast<double>(count) * static_cast<double>(c);
    const double gscale = denom > 0 ? 2.0 * grad_scale / denom : 0.0;
    std::vector<double> row_sq(static_cast<std::size_t>(n), 0.0);
    parallel_for(index_t{0}, n, [&](index_t r) {
        if (!rows.selected(r)) {
            if (grad) std::fill(dstudent.row(r), dstudent.row(r) + c, 0.f);
            return;
        }
        const float* s = student.row(r);
        const float* t = teacher.row(r);
        float* d = grad ? dstudent.row(r) : nullptr;
        double sq = 0;
        for (index_t j = 0; j < c; ++j) {
            const double e = static_cast<double>(s[j]) - static_cast<double>(t[j]);
            sq += e * e;
            if (d) d[j] = static_cast<float>(e * gscale);
        }
        row_sq[static_cast<std::size_t>(r)] = sq;
    });
    return denom > 0 ? detail::ordered_sum(row_sq) / denom : 0.0;
}

/// One term of a loss: its name, its value and its weight in the total.
struct loss_part {
    std::string name;
    double value = 0;
    double weight = 1;
};

/// The named terms of a loss (e.g. "ce" 1.0 and "mse" weighted 0.005, CPET's task + distillation); total() is
/// Σ weight · value. The caller passes each weight as the loss's grad_scale, so the gradients add up to the
/// gradient of the total.
class loss_parts {
public:
    loss_parts() = default;
    static loss_parts of(std::string name, double value, double weight = 1.0) {
        loss_parts p;
        p.add(std::move(name), value, weight);
        return p;
    }

    /// Appends a term; shape_error when the name is already there.
    loss_parts& add(std::string name, double value, double weight = 1.0) {
        require<shape_error>(find(name) == nullptr, "loss_parts: two terms are named \"", name, "\"");
        parts_.push_back({std::move(name), value, weight});
        return *this;
    }

    double total() const noexcept {
        double t = 0;
        for (const auto& p : parts_) t += p.weight * p.value;
        return t;
    }
    /// Whether the total and every term are finite.
    bool finite() const noexcept {
        for (const auto& p : parts_)
            if (!std::isfinite(p.value)) return false;
        return std::isfinite(total());
    }
    const std::vector<loss_part>& parts() const noexcept { return parts_; }
    bool empty() const noexcept { return parts_.empty(); }
    const loss_part* find(std::string_view name) const noexcept {
        for (const auto& p : parts_)
            if (p.name == name) return &p;
        return nullptr;
    }

    /// Adds the values of `o` term by term (by name; new names are appended): summing micro-batches.
    /// shape_error when a term appears with two weights.
    loss_parts& operator+=(const loss_parts& o) {
        for (const auto& q : o.parts_) {
            auto it = std::find_if(parts_.begin(), parts_.end(), [&](const loss_part& p) { return p.name == q.name; });
            if (it == parts_.end()) {
                parts_.push_back(q);
                continue;
            }
            require<shape_error>(it->weight == q.weight, "loss_parts: term \"", q.name, "\" has weight ", it->weight,
                                 " and ", q.weight);
            it->value += q.value;
        }
        return *this;
    }
    /// Multiplies every value (the mean over k micro-batches is the sum times 1/k).
    loss_parts& operator*=(double s) noexcept {
        for (auto& p : parts_) p.value *= s;
        return *this;
    }

    /// "0.7123 (ce 0.6931, mse×0.005 3.84)"; the total alone when there is a single unit-weight term.
    std::string str() const {
        std::string s = number(total());
        if (parts_.size() == 1 && parts_[0].weight == 1.0) return s;
        s += " (";
        for (std::size_t i = 0; i < parts_.size(); ++i) {
            if (i) s += ", ";
            s += parts_[i].name;
            if (parts_[i].weight != 1.0) s += "\xc3\x97" + number(parts_[i].weight);  // ×
            s += ' ';
            s += number(parts_[i].value);
        }
        return s + ")";
    }

private:
    static std::string number(double v) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.4g", v);
        return buf;
    }

    std::vector<loss_part> parts_;
};

}  // namespace cpet::train
