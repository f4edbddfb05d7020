// Prompt-embedding cache index (the contract: docs/cache.md); the Python face is qwenrl/cache.py.
//
// The index maps an int64 prompt key to a row ("slot") of the embedding slab, a [capacity, dim]
// tensor on the cache's device. Per slot it keeps the owner key, the step its value was written
// at, whether a value was written at all, and its place in a doubly-linked LRU list threaded
// through the slots (index `capacity` is the list's sentinel: next = least, prev = most recently
// used). Free slots sit on a stack.
//
// Every method takes the one mutex, and the slab's gathers and copies run under it too: the
// ownership check and the copy it guards must be atomic, or a concurrent plan could hand the slot
// to another key in between. The methods release the GIL while they hold the mutex, so Python
// threads never wait on each other while one of them holds it.
//
// Slot assignment is deterministic (qwenrl/cache.py documents the rule; the Python oracle in
// tests/cache_oracle.py follows it to the slot).
#include <torch/extension.h>

#include <array>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t kNoSlot = -1;

// Order of the counters in stats() / export_state() / import_state().
enum Stat : int { kHits = 0, kMisses, kStaleRefreshes, kEvictions, kDuplicates, kNumStats };

void check_index_tensor(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, what, ": ", name, " must be int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, ": ", name, " must be a CPU tensor, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, what, ": ", name, " must be 1-D, got shape ", t.sizes());
}

class EmbeddingCacheIndex {
 public:
  EmbeddingCacheIndex(at::Tensor slab, int64_t refresh_every)
      : slab_(std::move(slab)), refresh_every_(refresh_every) {
    TORCH_CHECK_VALUE(slab_.dim() == 2, "EmbeddingCache: the slab must be [capacity, dim], got ",
                      slab_.sizes());
    TORCH_CHECK_VALUE(slab_.size(0) >= 1 && slab_.size(1) >= 1,
                      "EmbeddingCache: capacity and dim must be >= 1, got ", slab_.sizes());
    TORCH_CHECK_VALUE(refresh_every >= -1, "EmbeddingCache: refresh_every must be >= -1, got ",
                      refresh_every);
    TORCH_CHECK_VALUE(!slab_.requires_grad(), "EmbeddingCache: the slab must not require grad");
    capacity_ = slab_.size(0);
    key_.assign(capacity_, 0);
    stamp_.assign(capacity_, 0);
    occupied_.assign(capacity_, 0);
    has_value_.assign(capacity_, 0);
    slot_epoch_.assign(capacity_, 0);
    slot_unique_.assign(capacity_, 0);
    prev_.assign(capacity_ + 1, capacity_);
    next_.assign(capacity_ + 1, capacity_);
    index_.reserve(static_cast<size_t>(capacity_) * 2);
    clear_locked();
  }

  // keys [B] -> (slots [B], compute_mask [B] bool, compute_index [B], compute_keys [U],
  // compute_slots [U]). Throws ValueError, changing nothing, when the batch has more distinct
  // keys than the cache has slots.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan(
      const at::Tensor& keys_in, int64_t step) {
    check_index_tensor(keys_in, "plan", "keys");
    const at::Tensor keys = keys_in.contiguous();
    const int64_t batch = keys.size(0);
    const int64_t* key = keys.data_ptr<int64_t>();

    std::vector<int64_t> row_unique(batch);     // batch row -> its distinct key
    std::vector<int64_t> unique_keys;           // distinct keys, in order of first appearance
    std::vector<int64_t> unique_slot;           // their slots (kNoSlot: not indexed yet)
    std::vector<uint8_t> unique_compute;        // whether each must be computed
    unique_keys.reserve(batch);
    unique_slot.reserve(batch);
    int64_t n_unique = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Pass 0 changes nothing: it finds the distinct keys, telling indexed keys apart by a
      // per-slot mark of this plan and new keys by a small map, so that a batch over capacity
      // is refused before any entry moves.
      ++plan_epoch_;
      std::unordered_map<int64_t, int64_t> new_unique;
      for (int64_t i = 0; i < batch; ++i) {
        auto it = index_.find(key[i]);
        if (it != index_.end()) {
          const int64_t slot = it->second;
          if (slot_epoch_[slot] != plan_epoch_) {
            slot_epoch_[slot] = plan_epoch_;
            slot_unique_[slot] = static_cast<int64_t>(unique_keys.size());
            unique_keys.push_back(key[i]);
            unique_slot.push_back(slot);
          }
          row_unique[i] = slot_unique_[slot];
        } else {
          auto [jt, inserted] =
              new_unique.try_emplace(key[i], static_cast<int64_t>(unique_keys.size()));
          if (inserted) {
            unique_keys.push_back(key[i]);
            unique_slot.push_back(kNoSlot);
          }
          row_unique[i] = jt->second;
        }
      }
      n_unique = static_cast<int64_t>(unique_keys.size());
      TORCH_CHECK_VALUE(n_unique <= capacity_, "EmbeddingCache.plan: the batch has ", n_unique,
                        " distinct keys but the cache holds at most ", capacity_,
                        " entries; raise capacity or split the batch");
      unique_compute.assign(n_unique, 0);

      // Pass 1: keys already indexed move to the most-recent end, so that the eviction in pass 2
      // (which takes from the least-recent end) can never pick a key of this batch.
      for (int64_t u = 0; u < n_unique; ++u) {
        const int64_t slot = unique_slot[u];
        if (slot == kNoSlot) continue;
        move_to_back(slot);
        if (!has_value_[slot]) {
          ++stats_[kMisses];  // planned earlier but never written
          unique_compute[u] = 1;
        } else if (is_fresh(stamp_[slot], step)) {
          ++stats_[kHits];
        } else {
          ++stats_[kStaleRefreshes];
          has_value_[slot] = 0;  // reads wait for the refreshed value
          unique_compute[u] = 1;
        }
      }
      // Pass 2: new keys take a free slot, else the least recently used entry's slot.
      for (int64_t u = 0; u < n_unique; ++u) {
        if (unique_slot[u] != kNoSlot) continue;
        const int64_t slot = take_slot();
        key_[slot] = unique_keys[u];
        stamp_[slot] = step;
        occupied_[slot] = 1;
        has_value_[slot] = 0;
        link_back(slot);
        index_.emplace(unique_keys[u], slot);
        unique_slot[u] = slot;
        unique_compute[u] = 1;
        ++stats_[kMisses];
      }
      stats_[kDuplicates] += batch - n_unique;
    }

    std::vector<int64_t> compute_pos(n_unique, -1);
    int64_t n_compute = 0;
    for (int64_t u = 0; u < n_unique; ++u) {
      if (unique_compute[u]) compute_pos[u] = n_compute++;
    }
    const auto long_opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor slots = at::empty({batch}, long_opts);
    at::Tensor compute_mask = at::empty({batch}, at::TensorOptions().dtype(at::kBool));
    at::Tensor compute_index = at::empty({batch}, long_opts);
    at::Tensor compute_keys = at::empty({n_compute}, long_opts);
    at::Tensor compute_slots = at::empty({n_compute}, long_opts);
    int64_t* slots_p = slots.data_ptr<int64_t>();
    bool* mask_p = compute_mask.data_ptr<bool>();
    int64_t* cindex_p = compute_index.data_ptr<int64_t>();
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t u = row_unique[i];
      slots_p[i] = unique_slot[u];
      mask_p[i] = unique_compute[u] != 0;
      cindex_p[i] = compute_pos[u];
    }
    int64_t* ckeys_p = compute_keys.data_ptr<int64_t>();
    int64_t* cslots_p = compute_slots.data_ptr<int64_t>();
    for (int64_t u = 0; u < n_unique; ++u) {
      if (compute_pos[u] < 0) continue;
      ckeys_p[compute_pos[u]] = unique_keys[u];
      cslots_p[compute_pos[u]] = unique_slot[u];
    }
    return {slots, compute_mask, compute_index, compute_keys, compute_slots};
  }

  // Stores detached copies of values [U, dim] for keys [U] at slots [U], stamped with step.
  // Returns -1, or the first position whose slot no longer belongs to its key (nothing written).
  int64_t write(const at::Tensor& keys_in, const at::Tensor& slots_in, const at::Tensor& values,
                int64_t step) {
    check_index_tensor(keys_in, "write", "keys");
    check_index_tensor(slots_in, "write", "slots");
    const int64_t n = keys_in.size(0);
    TORCH_CHECK_VALUE(slots_in.size(0) == n, "write: ", n, " keys but ", slots_in.size(0),
                      " slots");
    check_values(values, n, "write");
    const at::Tensor keys = keys_in.contiguous();
    const at::Tensor slots = slots_in.contiguous();
    const int64_t* key = keys.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();

    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t j = 0; j < n; ++j) {
      if (!owns(slot[j], key[j])) return j;
    }
    if (n == 0) return -1;
    {
      at::NoGradGuard no_grad;  // the slab must never join an autograd graph
      slab_.index_copy_(0, slots.to(slab_.device(), /*non_blocking=*/true), values.detach());
    }
    for (int64_t j = 0; j < n; ++j) {
      stamp_[slot[j]] = step;
      has_value_[slot[j]] = 1;
    }
    return -1;
  }

  // Gathers slab rows [B, dim] for keys/slots [B]. Rows where skip [B] is true are gathered
  // unchecked (the caller replaces them); every other row must hold a written value for its key.
  // Returns (-1, rows), or (first bad row, undefined tensor).
  std::tuple<int64_t, at::Tensor> read(const at::Tensor& keys_in, const at::Tensor& slots_in,
                                       const std::optional<at::Tensor>& skip_in) {
    check_index_tensor(keys_in, "read", "keys");
    check_index_tensor(slots_in, "read", "slots");
    const int64_t n = keys_in.size(0);
    TORCH_CHECK_VALUE(slots_in.size(0) == n, "read: ", n, " keys but ", slots_in.size(0),
                      " slots");
    const at::Tensor keys = keys_in.contiguous();
    const at::Tensor slots = slots_in.contiguous();
    const int64_t* key = keys.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    at::Tensor skip;
    const bool* skip_p = nullptr;
    if (skip_in.has_value()) {
      skip = skip_in->contiguous();
      TORCH_CHECK_TYPE(skip.scalar_type() == at::kBool, "read: skip must be bool, got ",
                       skip.scalar_type());
      TORCH_CHECK_VALUE(skip.device().is_cpu() && skip.dim() == 1 && skip.size(0) == n,
                        "read: skip must be a CPU bool tensor of shape [", n, "], got ",
                        skip.sizes(), " on ", skip.device());
      skip_p = skip.data_ptr<bool>();
    }

    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i = 0; i < n; ++i) {
      if (skip_p != nullptr && skip_p[i]) {
        if (slot[i] < 0 || slot[i] >= capacity_) return {i, at::Tensor()};
      } else if (!owns(slot[i], key[i]) || !has_value_[slot[i]]) {
        return {i, at::Tensor()};
      }
    }
    return {-1, slab_.index_select(0, slots.to(slab_.device(), /*non_blocking=*/true))};
  }

  int64_t invalidate_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t dropped = static_cast<int64_t>(index_.size());
    clear_locked();
    return dropped;
  }

  // Drops the given keys that are present, in order (their slots go on the free stack).
  int64_t invalidate(const at::Tensor& keys_in) {
    check_index_tensor(keys_in, "invalidate", "keys");
    const at::Tensor keys = keys_in.contiguous();
    const int64_t* key = keys.data_ptr<int64_t>();
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t dropped = 0;
    for (int64_t i = 0; i < keys.size(0); ++i) {
      auto it = index_.find(key[i]);
      if (it == index_.end()) continue;
      const int64_t slot = it->second;
      index_.erase(it);
      unlink(slot);
      occupied_[slot] = 0;
      has_value_[slot] = 0;
      free_.push_back(slot);
      ++dropped;
    }
    return dropped;
  }

  bool contains(int64_t key) {
    std::lock_guard<std::mutex> lock(mutex_);
    return index_.count(key) != 0;
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(index_.size());
  }

  std::array<int64_t, kNumStats> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  void reset_stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.fill(0);
  }

  // (keys [N] from least to most recently used, slots [N], stamps [N], has_value [N] bool,
  //  values [N, dim] (detached copies), free_slots [F] bottom to top of the stack, stats [5]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  export_state() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t n = static_cast<int64_t>(index_.size());
    const auto long_opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor keys = at::empty({n}, long_opts);
    at::Tensor slots = at::empty({n}, long_opts);
    at::Tensor stamps = at::empty({n}, long_opts);
    at::Tensor has_value = at::empty({n}, at::TensorOptions().dtype(at::kBool));
    int64_t* key_p = keys.data_ptr<int64_t>();
    int64_t* slot_p = slots.data_ptr<int64_t>();
    int64_t* stamp_p = stamps.data_ptr<int64_t>();
    bool* value_p = has_value.data_ptr<bool>();
    int64_t i = 0;
    for (int64_t s = next_[capacity_]; s != capacity_; s = next_[s], ++i) {
      key_p[i] = key_[s];
      slot_p[i] = s;
      stamp_p[i] = stamp_[s];
      value_p[i] = has_value_[s] != 0;
    }
    at::Tensor free_slots = at::tensor(free_, long_opts);
    at::Tensor stats = at::tensor(std::vector<int64_t>(stats_.begin(), stats_.end()), long_opts);
    at::Tensor values = slab_.index_select(0, slots.to(slab_.device()));
    return {keys, slots, stamps, has_value, values, free_slots, stats};
  }

  // Inverse of export_state(); checks that the pieces describe a consistent index first and
  // throws ValueError, changing nothing, when they do not.
  void import_state(const at::Tensor& keys_in, const at::Tensor& slots_in,
                    const at::Tensor& stamps_in, const at::Tensor& has_value_in,
                    const at::Tensor& values, const at::Tensor& free_in,
                    const at::Tensor& stats_in) {
    check_index_tensor(keys_in, "load_state_dict", "keys");
    check_index_tensor(slots_in, "load_state_dict", "slots");
    check_index_tensor(stamps_in, "load_state_dict", "stamps");
    check_index_tensor(free_in, "load_state_dict", "free_slots");
    check_index_tensor(stats_in, "load_state_dict", "stats");
    const int64_t n = keys_in.size(0);
    TORCH_CHECK_VALUE(slots_in.size(0) == n && stamps_in.size(0) == n &&
                          has_value_in.dim() == 1 && has_value_in.size(0) == n,
                      "load_state_dict: keys, slots, stamps and has_value must have one length");
    TORCH_CHECK_TYPE(has_value_in.scalar_type() == at::kBool && has_value_in.device().is_cpu(),
                     "load_state_dict: has_value must be a CPU bool tensor");
    TORCH_CHECK_VALUE(stats_in.size(0) == kNumStats, "load_state_dict: expected ", kNumStats,
                      " stats, got ", stats_in.size(0));
    TORCH_CHECK_VALUE(n + free_in.size(0) == capacity_, "load_state_dict: ", n, " entries and ",
                      free_in.size(0), " free slots do not add up to capacity ", capacity_);
    check_values(values, n, "load_state_dict");
    const at::Tensor keys = keys_in.contiguous();
    const at::Tensor slots = slots_in.contiguous();
    const at::Tensor stamps = stamps_in.contiguous();
    const at::Tensor has_value = has_value_in.contiguous();
    const at::Tensor free_slots = free_in.contiguous();
    const int64_t* key = keys.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* free_p = free_slots.data_ptr<int64_t>();

    std::vector<uint8_t> seen(capacity_, 0);
    auto claim = [&](int64_t s) {
      TORCH_CHECK_VALUE(s >= 0 && s < capacity_ && !seen[s], "load_state_dict: slot ", s,
                        " is out of range or appears twice");
      seen[s] = 1;
    };
    std::unordered_map<int64_t, int64_t> index;
    index.reserve(static_cast<size_t>(capacity_) * 2);
    for (int64_t i = 0; i < n; ++i) {
      claim(slot[i]);
      TORCH_CHECK_VALUE(index.emplace(key[i], slot[i]).second, "load_state_dict: key ", key[i],
                        " appears twice");
    }
    for (int64_t i = 0; i < free_slots.size(0); ++i) claim(free_p[i]);

    std::lock_guard<std::mutex> lock(mutex_);
    clear_locked();
    free_.assign(free_p, free_p + free_slots.size(0));
    index_ = std::move(index);
    const int64_t* stamp = stamps.data_ptr<int64_t>();
    const bool* value_ok = has_value.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      key_[slot[i]] = key[i];
      stamp_[slot[i]] = stamp[i];
      occupied_[slot[i]] = 1;
      has_value_[slot[i]] = value_ok[i] ? 1 : 0;
      link_back(slot[i]);
    }
    const at::Tensor stats = stats_in.contiguous();
    for (int k = 0; k < kNumStats; ++k) stats_[k] = stats.data_ptr<int64_t>()[k];
    if (n > 0) {
      at::NoGradGuard no_grad;
      slab_.index_copy_(0, slots.to(slab_.device()), values.detach());
    }
  }

  int64_t capacity() const { return capacity_; }
  int64_t refresh_every() const { return refresh_every_; }
  at::Tensor slab() const { return slab_; }

 private:
  bool is_fresh(int64_t stamp, int64_t step) const {
    return refresh_every_ < 0 || (refresh_every_ > 0 && step - stamp < refresh_every_);
  }

  bool owns(int64_t slot, int64_t key) const {
    return slot >= 0 && slot < capacity_ && occupied_[slot] && key_[slot] == key;
  }

  void check_values(const at::Tensor& values, int64_t rows, const char* what) const {
    TORCH_CHECK_TYPE(values.scalar_type() == slab_.scalar_type(), what, ": values must be ",
                     slab_.scalar_type(), " (the cache's dtype), got ", values.scalar_type());
    TORCH_CHECK_VALUE(values.device() == slab_.device(), what, ": values must be on ",
                      slab_.device(), " (the cache's device), got ", values.device());
    TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == rows &&
                          values.size(1) == slab_.size(1),
                      what, ": values must have shape [", rows, ", ", slab_.size(1), "], got ",
                      values.sizes());
  }

  // Empty index; the free stack pops slot 0 first, then 1, 2, ...
  void clear_locked() {
    index_.clear();
    std::fill(occupied_.begin(), occupied_.end(), 0);
    std::fill(has_value_.begin(), has_value_.end(), 0);
    next_[capacity_] = prev_[capacity_] = capacity_;
    free_.clear();
    for (int64_t s = capacity_ - 1; s >= 0; --s) free_.push_back(s);
  }

  int64_t take_slot() {
    if (!free_.empty()) {
      const int64_t slot = free_.back();
      free_.pop_back();
      return slot;
    }
    const int64_t victim = next_[capacity_];
    TORCH_CHECK(victim != capacity_, "EmbeddingCache: no slot to evict (index corrupted)");
    unlink(victim);
    index_.erase(key_[victim]);
    occupied_[victim] = 0;
    has_value_[victim] = 0;
    ++stats_[kEvictions];
    return victim;
  }

  void unlink(int64_t slot) {
    next_[prev_[slot]] = next_[slot];
    prev_[next_[slot]] = prev_[slot];
  }

  void link_back(int64_t slot) {
    const int64_t last = prev_[capacity_];
    prev_[slot] = last;
    next_[slot] = capacity_;
    next_[last] = slot;
    prev_[capacity_] = slot;
  }

  void move_to_back(int64_t slot) {
    unlink(slot);
    link_back(slot);
  }

  std::mutex mutex_;
  at::Tensor slab_;  // [capacity, dim] on the cache's device
  int64_t capacity_ = 0;
  int64_t refresh_every_ = 0;
  std::unordered_map<int64_t, int64_t> index_;  // key -> slot
  std::vector<int64_t> key_, stamp_;            // per slot
  std::vector<uint8_t> occupied_, has_value_;   // per slot
  std::vector<int64_t> prev_, next_;            // per slot, plus the sentinel at [capacity]
  std::vector<int64_t> free_;                   // stack; back() is taken first
  std::array<int64_t, kNumStats> stats_{};
  // Scratch for plan(): slot_epoch_[s] == plan_epoch_ marks a slot seen in the current plan,
  // slot_unique_[s] its distinct-key position.
  uint64_t plan_epoch_ = 0;
  std::vector<uint64_t> slot_epoch_;
  std::vector<int64_t> slot_unique_;
};

}  // namespace

void init_embedding_cache(pybind11::module_& m) {
  namespace py = pybind11;
  using Index = EmbeddingCacheIndex;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::class_<Index>(m, "EmbeddingCacheIndex",
                    "Thread-safe key -> slot index (LRU, step stamps, stats) that owns the "
                    "embedding slab; wrapped by qwenrl.cache.EmbeddingCache.")
      .def(py::init<at::Tensor, int64_t>(), py::arg("slab"), py::arg("refresh_every"))
      .def("plan", &Index::plan, py::arg("keys"), py::arg("step"), release_gil())
      .def("write", &Index::write, py::arg("keys"), py::arg("slots"), py::arg("values"),
           py::arg("step"), release_gil())
      .def("read", &Index::read, py::arg("keys"), py::arg("slots"), py::arg("skip") = py::none(),
           release_gil())
      .def("invalidate_all", &Index::invalidate_all, release_gil())
      .def("invalidate", &Index::invalidate, py::arg("keys"), release_gil())
      .def("contains", &Index::contains, py::arg("key"), release_gil())
      .def("size", &Index::size, release_gil())
      .def("stats", &Index::stats, release_gil())
      .def("reset_stats", &Index::reset_stats, release_gil())
      .def("export_state", &Index::export_state, release_gil())
      .def("import_state", &Index::import_state, py::arg("keys"), py::arg("slots"),
           py::arg("stamps"), py::arg("has_value"), py::arg("values"), py::arg("free_slots"),
           py::arg("stats"), release_gil())
      .def_property_readonly("capacity", &Index::capacity)
      .def_property_readonly("refresh_every", &Index::refresh_every)
      .def_property_readonly("slab", &Index::slab);
}
