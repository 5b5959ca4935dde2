// Rows grouped by adapter (adapter_rows.h): the ids' check and the counting sort.
#include "cpu/adapter_rows.h"

#include <stdexcept>
#include <string>

namespace mfl::cpu {

AdapterRows::AdapterRows(const mx::array* ids, int64_t n, int64_t m)
    : ids_(ids ? ids->data<int32_t>() : nullptr), n_(n), slot_(n, -1), rows_of_(n, 0) {
  if (!ids_) {
    slot_[0] = 0;
    used_count_ = 1;
    rows_of_[0] = m;
    return;
  }
  for (int64_t row = 0; row < m; ++row) {
    const int32_t id = ids_[row];
    if (id < -1 || id >= n) {
      // Checked before any read through an id: never an adapter out of bounds.
      throw std::invalid_argument("[mlx_fused_lora] adapter_ids must be in [-1, " +
                                  std::to_string(n) + ") (n = " + std::to_string(n) +
                                  " adapters; -1: base only), got " + std::to_string(id) +
                                  " at row " + std::to_string(row));
    }
    if (id >= 0 && slot_[id] < 0) {
      slot_[id] = used_count_++;
    }
    if (id >= 0) {
      ++rows_of_[id];
    }
  }
}

RowGroups::RowGroups(const AdapterRows& rows, int64_t row0, int64_t size)
    : rows_(rows), row0_(row0), size_(size), ends_(rows.count() + 1, size) {
  if (!rows.has_ids()) {
    ends_[0] = 0;  // no -1 rows; adapter 0 (n = 1) holds every position, in order
    return;
  }
  sort([row0](int64_t pos) { return row0 + pos; });
}

RowGroups::RowGroups(const AdapterRows& rows, const std::vector<int32_t>& listed)
    : rows_(rows), row0_(0), size_(listed.size()), ends_(rows.count() + 1, 0) {
  sort([&listed](int64_t pos) { return int64_t(listed[pos]); });
}

// A stable counting sort of the rows on id + 1: counts, exclusive offsets, placement.
template <typename RowAt>
void RowGroups::sort(RowAt&& row_at) {
  std::vector<int64_t> next(rows_.count() + 1, 0);
  for (int64_t pos = 0; pos < size_; ++pos) {
    ++next[rows_.adapter(row_at(pos)) + 1];
  }
  int64_t offset = 0;
  for (size_t g = 0; g < next.size(); ++g) {
    const int64_t c = next[g];
    next[g] = offset;
    offset += c;
    ends_[g] = offset;
  }
  order_.resize(size_);
  for (int64_t pos = 0; pos < size_; ++pos) {
    const int64_t row = row_at(pos);
    order_[next[rows_.adapter(row) + 1]++] = static_cast<int32_t>(row);
  }
}

int64_t RowGroups::group_end(int64_t pos) const { return ends_[adapter(pos) + 1]; }

}  // namespace mfl::cpu
