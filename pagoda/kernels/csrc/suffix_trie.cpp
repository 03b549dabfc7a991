// Suffix decoding's trie (pagoda/spec_decode/suffix.py has the reference in Python, and the
// tests hold this one to it): every substring of at most max_depth tokens of the sequences
// it holds, each node counting its occurrences, grown by one node per held suffix per new
// token. In Python a token cost ~24 dictionary operations and list appends (about 20 us);
// here a few hundred nanoseconds, so drafting costs little next to a step.
//
// Nodes are indexes into flat arrays; edges live in one hash map keyed by
// parent << 21 | token. Each node keeps the sum of its children's counts and its most
// frequent child (updated as counts grow), so a draft never scans children. Held sequences
// (a request's own tokens) keep their tails: the nodes of their last 1..max_depth tokens.
// Invariant: a node's count is the number of (sequence, start) pairs whose substring passes
// through it; its kids_total is the sum of its children's counts.
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pagoda_suffix {

constexpr int kTokenBits = 21;
constexpr int32_t kNone = -1;
constexpr int32_t kRoot = 0;

class SuffixTrie {
 public:
  explicit SuffixTrie(int max_depth) : max_depth_(max_depth) {
    if (max_depth < 1) throw std::invalid_argument("max_depth must be >= 1");
    new_node();  // the root
  }

  // Sequence `seq` (held: its tails are kept) grows by `tokens`.
  void extend(int64_t seq, const std::vector<int64_t>& tokens) {
    std::vector<int32_t>& tails = tails_[seq];
    for (int64_t t : tokens) append(tails, t);
  }

  void forget(int64_t seq) { tails_.erase(seq); }

  // A whole sequence, its tails not kept.
  void add(const std::vector<int64_t>& tokens) {
    std::vector<int32_t> tails;
    for (int64_t t : tokens) append(tails, t);
  }

  void remove(const std::vector<int64_t>& tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    std::vector<std::tuple<int32_t, int64_t, int32_t>> path;
    for (int64_t start = 0; start < n; ++start) {
      path.clear();
      int32_t node = kRoot;
      for (int64_t i = start; i < std::min(n, start + max_depth_); ++i) {
        auto it = edges_.find(key(node, tokens[i]));
        if (it == edges_.end()) throw std::invalid_argument("removing a sequence never added");
        path.emplace_back(node, tokens[i], it->second);
        node = it->second;
      }
      for (size_t i = 0; i < path.size(); ++i) {
        auto [parent, token, child] = path[i];
        count_[child] -= 1;
        kids_total_[parent] -= 1;
        if (count_[child] != 0) continue;
        if (best_[parent] == child) best_[parent] = best_token_[parent] = kNone;
        for (size_t j = i; j < path.size(); ++j) {  // counted only this substring: so the rest
          auto [p, tok, c] = path[j];
          edges_.erase(key(p, tok));
          free_node(c);
        }
        break;
      }
    }
  }

  int64_t count(int64_t node) const { return count_.at(node); }

  int64_t num_nodes() const {
    return static_cast<int64_t>(count_.size() - free_.size()) - 1;
  }

  // (node, length) of the longest suffix of held sequence `seq` (at most max_len tokens) that
  // occurred earlier too: its tail node counts the suffix's own occurrence, so one more.
  std::pair<int64_t, int64_t> own_match(int64_t seq, int64_t max_len) const {
    auto it = tails_.find(seq);
    if (it == tails_.end()) return {kRoot, 0};
    const std::vector<int32_t>& tails = it->second;
    int64_t lo = 0, hi = std::min<int64_t>({max_len, static_cast<int64_t>(tails.size()),
                                             max_depth_ - 1});
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (count_[tails[mid - 1]] >= 2) lo = mid; else hi = mid - 1;
    }
    return lo ? std::make_pair(static_cast<int64_t>(tails[lo - 1]), lo)
              : std::make_pair(static_cast<int64_t>(kRoot), int64_t{0});
  }

  // (node, length) of the longest suffix of `context` (at most max_len tokens) that occurs
  // here with a token after it; occurring is monotone in the length: a binary search.
  std::pair<int64_t, int64_t> longest_match(const std::vector<int64_t>& context,
                                            int64_t max_len) const {
    const int64_t n = static_cast<int64_t>(context.size());
    int64_t lo = 0, hi = std::min(max_len, n), best = kRoot;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      const int32_t node = walk(context, n - mid, n);
      if (node != kNone && kids_total_[node]) {
        lo = mid;
        best = node;
      } else {
        hi = mid - 1;
      }
    }
    return {best, lo};
  }

  // Follow the most frequent child while the running product of the children's shares
  // stays >= min_prob, for at most k tokens: (tokens, the products).
  std::pair<std::vector<int64_t>, std::vector<double>> draft(int64_t node, int64_t k,
                                                             double min_prob) const {
    std::vector<int64_t> tokens;
    std::vector<double> probs;
    double prob = 1.0;
    int32_t at = static_cast<int32_t>(node);
    while (static_cast<int64_t>(tokens.size()) < k) {
      const int32_t child = best_.at(at);
      if (child == kNone) break;
      prob *= static_cast<double>(count_[child]) / kids_total_[at];
      if (prob < min_prob) break;
      tokens.push_back(best_token_[at]);
      probs.push_back(prob);
      at = child;
    }
    return {tokens, probs};
  }

  std::vector<std::tuple<int64_t, int64_t, int64_t>> edges() const {
    std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
    out.reserve(edges_.size());
    const uint64_t mask = (uint64_t{1} << kTokenBits) - 1;
    for (const auto& [k, child] : edges_)
      out.emplace_back(static_cast<int64_t>(k >> kTokenBits), static_cast<int64_t>(k & mask),
                       child);
    return out;
  }

 private:
  static uint64_t key(int32_t parent, int64_t token) {
    return (static_cast<uint64_t>(parent) << kTokenBits) | static_cast<uint64_t>(token);
  }

  void append(std::vector<int32_t>& tails, int64_t token) {
    if (token < 0 || token >= (int64_t{1} << kTokenBits))
      throw std::invalid_argument("token id out of the trie's range");
    const size_t keep = std::min<size_t>(tails.size(), max_depth_ - 1);
    std::vector<int32_t> next;
    next.reserve(keep + 1);
    next.push_back(step(kRoot, token));
    for (size_t i = 0; i < keep; ++i) next.push_back(step(tails[i], token));
    tails.swap(next);
  }

  int32_t step(int32_t node, int64_t token) {
    auto [it, inserted] = edges_.try_emplace(key(node, token), kNone);
    if (inserted) it->second = new_node();
    const int32_t child = it->second;
    const int32_t c = ++count_[child];
    kids_total_[node] += 1;
    const int32_t b = best_[node];
    if (b == kNone || c > count_[b]) {
      best_[node] = child;
      best_token_[node] = static_cast<int32_t>(token);
    }
    return child;
  }

  int32_t walk(const std::vector<int64_t>& tokens, int64_t from, int64_t to) const {
    int32_t node = kRoot;
    for (int64_t i = from; i < to; ++i) {
      auto it = edges_.find(key(node, tokens[i]));
      if (it == edges_.end()) return kNone;
      node = it->second;
    }
    return node;
  }

  int32_t new_node() {
    if (!free_.empty()) {
      const int32_t n = free_.back();
      free_.pop_back();
      return n;
    }
    count_.push_back(0);
    kids_total_.push_back(0);
    best_.push_back(kNone);
    best_token_.push_back(kNone);
    return static_cast<int32_t>(count_.size() - 1);
  }

  void free_node(int32_t n) {
    count_[n] = kids_total_[n] = 0;
    best_[n] = best_token_[n] = kNone;
    free_.push_back(n);
  }

  int64_t max_depth_;
  std::unordered_map<uint64_t, int32_t> edges_;
  std::vector<int32_t> count_, kids_total_, best_, best_token_, free_;
  std::unordered_map<int64_t, std::vector<int32_t>> tails_;
};

void bind(py::module_& m) {
  py::class_<SuffixTrie>(m, "SuffixTrie",
                         "Suffix decoding's trie (pagoda/spec_decode/suffix.py's, in C++).")
      .def(py::init<int>(), py::arg("max_depth"))
      .def("extend", &SuffixTrie::extend, py::arg("seq"), py::arg("tokens"))
      .def("forget", &SuffixTrie::forget, py::arg("seq"))
      .def("add", &SuffixTrie::add, py::arg("tokens"))
      .def("remove", &SuffixTrie::remove, py::arg("tokens"))
      .def("count", &SuffixTrie::count, py::arg("node"))
      .def("own_match", &SuffixTrie::own_match, py::arg("seq"), py::arg("max_len"))
      .def("longest_match", &SuffixTrie::longest_match, py::arg("context"), py::arg("max_len"))
      .def("draft", &SuffixTrie::draft, py::arg("node"), py::arg("k"), py::arg("min_prob"))
      .def("edges", &SuffixTrie::edges)
      .def_property_readonly("num_nodes", &SuffixTrie::num_nodes);
}

}  // namespace pagoda_suffix
