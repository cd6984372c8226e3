#include "dstrain/topology.h"

#include <sched.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>

#include "dstrain/device.h"
#include "dstrain/error.h"
#if DSTRAIN_HAVE_CUDA
#include "collectives/nvml/topology_nvml.h"
#endif

namespace dstrain {

// ---------------------------------------------------------------------------------------------
// Links and the Topology value

const char* link_kind_name(LinkKind kind) {
  switch (kind) {
    case LinkKind::Self: return "X";
    case LinkKind::NVSwitch: return "NVSwitch";
    case LinkKind::NVLink: return "NVLink";
    case LinkKind::PIX: return "PIX";
    case LinkKind::PXB: return "PXB";
    case LinkKind::PHB: return "PHB";
    case LinkKind::Node: return "NODE";
    case LinkKind::Sys: return "SYS";
    case LinkKind::Network: return "NET";
  }
  return "?";
}

double estimate_link_gbps(LinkKind kind, int nvlinks, const TopologyEstimates& est) {
  const double pcie = est.pcie_gbps > 0 ? est.pcie_gbps : 25.0;
  switch (kind) {
    case LinkKind::Self: return 0.0;
    case LinkKind::NVSwitch:
    case LinkKind::NVLink: return est.nvlink_gbps_per_link * std::max(nvlinks, 1);
    case LinkKind::PIX:
    case LinkKind::PXB: return pcie;
    case LinkKind::PHB: return 0.8 * pcie;
    case LinkKind::Node: return 0.7 * pcie;
    case LinkKind::Sys: return 0.4 * pcie;
    case LinkKind::Network: return est.network_gbps;
  }
  return 0.0;
}

Topology::Topology(std::vector<GpuInfo> gpus, std::vector<std::vector<Link>> links, std::vector<bool> nvswitch_per_node,
                   std::string source)
    : gpus_(std::move(gpus)), links_(std::move(links)), nvswitch_(std::move(nvswitch_per_node)),
      source_(std::move(source)) {
  const std::size_t n = gpus_.size();
  DSTRAIN_CHECK(links_.size() == n, "topology: link matrix has " + std::to_string(links_.size()) + " rows for " +
                                        std::to_string(n) + " GPUs");
  if (nvswitch_.empty()) nvswitch_.push_back(false);
  for (std::size_t i = 0; i < n; ++i) {
    DSTRAIN_CHECK(links_[i].size() == n, "topology: link row " + std::to_string(i) + " has the wrong length");
    DSTRAIN_CHECK(links_[i][i].kind == LinkKind::Self, "topology: GPU " + std::to_string(i) + " is not X to itself");
    DSTRAIN_CHECK(gpus_[i].node >= 0 && gpus_[i].node < node_count(),
                  "topology: GPU " + std::to_string(i) + " names node " + std::to_string(gpus_[i].node));
    for (std::size_t j = 0; j < n; ++j) {
      DSTRAIN_CHECK(links_[i][j].kind == links_[j][i].kind && links_[i][j].nvlinks == links_[j][i].nvlinks,
                    "topology: link GPU" + std::to_string(i) + "-GPU" + std::to_string(j) + " is " +
                        link_kind_name(links_[i][j].kind) + " one way and " + link_kind_name(links_[j][i].kind) +
                        " the other");
      DSTRAIN_CHECK(i == j || links_[i][j].kind != LinkKind::Self,
                    "topology: GPU" + std::to_string(i) + "-GPU" + std::to_string(j) + " marked X off the diagonal");
    }
  }
}

const Link& Topology::link(int i, int j) const {
  DSTRAIN_CHECK(i >= 0 && j >= 0 && i < gpu_count() && j < gpu_count(),
                "GPU pair (" + std::to_string(i) + ", " + std::to_string(j) + ") outside the topology of " +
                    std::to_string(gpu_count()) + " GPUs");
  return links_[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
}

bool Topology::has_nvswitch(int node) const {
  return node >= 0 && node < node_count() && nvswitch_[static_cast<std::size_t>(node)];
}

std::vector<int> Topology::gpus_of_node(int node) const {
  std::vector<int> out;
  for (int i = 0; i < gpu_count(); ++i)
    if (gpus_[static_cast<std::size_t>(i)].node == node) out.push_back(i);
  return out;
}

bool Topology::all_pairs_nvlink(int node) const {
  const auto ids = gpus_of_node(node);
  for (int a : ids)
    for (int b : ids) {
      if (a == b) continue;
      const LinkKind k = link(a, b).kind;
      if (k != LinkKind::NVLink && k != LinkKind::NVSwitch) return false;
    }
  return true;
}

namespace {

std::string format_gbps(double gbps) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(gbps < 10 ? 1 : 0) << gbps;
  return s.str();
}

std::string link_cell(const Link& l) {
  switch (l.kind) {
    case LinkKind::Self: return "X";
    case LinkKind::NVSwitch: return "NVS" + std::to_string(l.nvlinks) + "/" + format_gbps(l.gbps);
    case LinkKind::NVLink: return "NV" + std::to_string(l.nvlinks) + "/" + format_gbps(l.gbps);
    default: return std::string(link_kind_name(l.kind)) + "/" + format_gbps(l.gbps);
  }
}

}  // namespace

std::string Topology::describe() const {
  std::ostringstream out;
  out << "topology (" << source_ << "): " << gpu_count() << " GPU(s) on " << node_count() << " node(s)\n";
  if (gpu_count() == 0) return out.str();
  out << "cells: link kind + NVLink count / estimated GB/s per direction (NVS = NVLinks through NVSwitch)\n";
  const int width = 11;
  out << std::setw(7) << "";
  for (int j = 0; j < gpu_count(); ++j) out << std::setw(width) << ("GPU" + std::to_string(j));
  out << "\n";
  for (int i = 0; i < gpu_count(); ++i) {
    out << std::left << std::setw(7) << ("GPU" + std::to_string(i)) << std::right;
    for (int j = 0; j < gpu_count(); ++j) out << std::setw(width) << link_cell(link(i, j));
    out << "\n";
  }
  for (int node = 0; node < node_count(); ++node)
    out << "node " << node << ": " << gpus_of_node(node).size() << " GPU(s), NVSwitch "
        << (has_nvswitch(node) ? "yes" : "no") << ", all pairs NVLink " << (all_pairs_nvlink(node) ? "yes" : "no")
        << "\n";
  for (int i = 0; i < gpu_count(); ++i) {
    const GpuInfo& g = gpus_[static_cast<std::size_t>(i)];
    out << "GPU" << i << ": node " << g.node << " local " << g.local_index << ", NUMA "
        << (g.numa_node >= 0 ? std::to_string(g.numa_node) : std::string("?")) << ", CPU affinity "
        << (g.cpu_affinity.empty() ? std::string("?") : g.cpu_affinity);
    if (!g.name.empty()) out << ", " << g.name;
    if (!g.pci_bus_id.empty()) out << " at " << g.pci_bus_id;
    out << "\n";
  }
  return out.str();
}

// ---------------------------------------------------------------------------------------------
// nvidia-smi topo -m text

namespace {

[[noreturn]] void bad_line(const std::string& source, int line_no, const std::string& line, const std::string& why) {
  DSTRAIN_THROW(ErrorCode::InvalidArgument,
                source + " line " + std::to_string(line_no) + ": " + why + " (line: '" + line + "')");
}

std::vector<std::string> split_ws(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> out;
  for (std::string t; in >> t;) out.push_back(t);
  return out;
}

std::string trim(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// nvidia-smi underlines the header with terminal escapes (ESC [ 4 m ... ESC [ 0 m) even when its
// output goes to a file: drop every CSI sequence.
std::string strip_terminal_escapes(const std::string& line) {
  std::string out;
  out.reserve(line.size());
  for (std::size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '\x1b' && i + 1 < line.size() && line[i + 1] == '[') {
      i += 2;
      while (i < line.size() && !(line[i] >= '@' && line[i] <= '~')) ++i;  // up to the final byte
      continue;
    }
    out += line[i];
  }
  return out;
}

// "GPU12" -> 12, else -1.
int gpu_column_index(const std::string& name) {
  if (name.size() < 4 || !starts_with(name, "GPU")) return -1;
  for (std::size_t i = 3; i < name.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  return std::stoi(name.substr(3));
}

enum class Trailing { CpuAffinity, NumaAffinity, GpuNumaId };

// Header tokens -> device columns and the trailing columns, whose names have spaces.
struct Header {
  std::vector<std::string> devices;  // GPU0.., NIC0.., mlx5_0..
  std::vector<Trailing> trailing;
  int gpu_count = 0;
};

Header parse_header(const std::vector<std::string>& tokens, const std::string& source, int line_no,
                    const std::string& line) {
  Header h;
  std::size_t i = 0;
  bool in_trailing = false;
  while (i < tokens.size()) {
    const std::string& t = tokens[i];
    auto next_is = [&](std::size_t k, const char* word) { return i + k < tokens.size() && tokens[i + k] == word; };
    if (t == "CPU" && next_is(1, "Affinity")) {
      h.trailing.push_back(Trailing::CpuAffinity), i += 2, in_trailing = true;
    } else if (t == "NUMA" && next_is(1, "Affinity")) {
      h.trailing.push_back(Trailing::NumaAffinity), i += 2, in_trailing = true;
    } else if (t == "NUMA") {  // some copies shorten the column to "NUMA"
      h.trailing.push_back(Trailing::NumaAffinity), i += 1, in_trailing = true;
    } else if (t == "GPU" && next_is(1, "NUMA") && next_is(2, "ID")) {
      h.trailing.push_back(Trailing::GpuNumaId), i += 3, in_trailing = true;
    } else if (in_trailing) {
      bad_line(source, line_no, line, "unknown column '" + t + "' after the affinity columns");
    } else {
      const int g = gpu_column_index(t);
      if (g >= 0) {
        if (g != h.gpu_count)
          bad_line(source, line_no, line, "GPU column '" + t + "' out of order: expected GPU" +
                                              std::to_string(h.gpu_count));
        if (h.devices.size() != static_cast<std::size_t>(h.gpu_count))
          bad_line(source, line_no, line, "GPU column '" + t + "' after a non-GPU column");
        ++h.gpu_count;
      }
      h.devices.push_back(t);
      ++i;
    }
  }
  if (h.gpu_count == 0) bad_line(source, line_no, line, "header names no GPU columns");
  return h;
}

// One GPU-GPU cell.
Link parse_cell(const std::string& cell, const std::string& source, int line_no, const std::string& line, int row,
                int col) {
  Link l;
  const std::string where = " for GPU" + std::to_string(row) + "-GPU" + std::to_string(col);
  if (cell == "X") {
    if (row != col) bad_line(source, line_no, line, "cell 'X' off the diagonal" + where);
    l.kind = LinkKind::Self;
    return l;
  }
  if (row == col) bad_line(source, line_no, line, "cell '" + cell + "' on the diagonal" + where + ", expected X");
  if (cell.size() > 2 && starts_with(cell, "NV")) {
    bool digits = true;
    for (std::size_t i = 2; i < cell.size(); ++i) digits = digits && std::isdigit(static_cast<unsigned char>(cell[i]));
    if (digits && cell.size() <= 5) {
      l.kind = LinkKind::NVLink;
      l.nvlinks = std::stoi(cell.substr(2));
      if (l.nvlinks > 0) return l;
    }
  } else if (cell == "PIX") {
    l.kind = LinkKind::PIX;
    return l;
  } else if (cell == "PXB") {
    l.kind = LinkKind::PXB;
    return l;
  } else if (cell == "PHB") {
    l.kind = LinkKind::PHB;
    return l;
  } else if (cell == "NODE") {
    l.kind = LinkKind::Node;
    return l;
  } else if (cell == "SYS" || cell == "SOC") {  // drivers before 384 printed SOC
    l.kind = LinkKind::Sys;
    return l;
  }
  bad_line(source, line_no, line, "cell '" + cell + "'" + where + ": expected X, NV#, PIX, PXB, PHB, NODE or SYS");
}

struct ParsedNode {
  std::vector<GpuInfo> gpus;
  std::vector<std::vector<Link>> links;
  std::vector<int> row_line;  // line number of each GPU row, for symmetry errors
};

// `first_line`: the number of the text's first line within the file, for messages.
Topology parse_one_node(const std::vector<std::string>& lines, int first_line, const TopologyEstimates& est_in,
                        const std::string& source) {
  Header header;
  bool have_header = false;
  ParsedNode p;
  int last_line = first_line;
  for (std::size_t k = 0; k < lines.size(); ++k) {
    const int line_no = first_line + static_cast<int>(k);
    const std::string line = strip_terminal_escapes(lines[k]);
    const std::string t = trim(line);
    last_line = line_no;
    if (t.empty() || t[0] == '#') continue;
    if (starts_with(t, "Legend:") || starts_with(t, "NIC Legend:")) break;
    const auto tokens = split_ws(t);
    if (!have_header) {
      if (tokens.empty() || gpu_column_index(tokens[0]) != 0)
        bad_line(source, line_no, line, "expected the matrix header starting with GPU0");
      header = parse_header(tokens, source, line_no, line);
      have_header = true;
      p.gpus.resize(static_cast<std::size_t>(header.gpu_count));
      p.links.assign(static_cast<std::size_t>(header.gpu_count), {});
      p.row_line.assign(static_cast<std::size_t>(header.gpu_count), 0);
      continue;
    }
    const int row = gpu_column_index(tokens[0]);
    if (row < 0) {
      // NIC rows (NIC0, mlx5_0) are skipped; anything else is not part of the matrix.
      if (std::find(header.devices.begin(), header.devices.end(), tokens[0]) != header.devices.end()) continue;
      bad_line(source, line_no, line, "row '" + tokens[0] + "' is not a GPU or a column of the header");
    }
    if (row >= header.gpu_count)
      bad_line(source, line_no, line, "row GPU" + std::to_string(row) + " but the header has " +
                                          std::to_string(header.gpu_count) + " GPU columns");
    const std::size_t r = static_cast<std::size_t>(row);
    if (p.row_line[r] != 0) bad_line(source, line_no, line, "second row for GPU" + std::to_string(row));
    const std::size_t cells = header.devices.size();
    if (tokens.size() < 1 + cells)
      bad_line(source, line_no, line, "row GPU" + std::to_string(row) + " has " + std::to_string(tokens.size() - 1) +
                                          " cells, expected at least " + std::to_string(cells));
    if (tokens.size() > 1 + cells + header.trailing.size())
      bad_line(source, line_no, line, "row GPU" + std::to_string(row) + " has " + std::to_string(tokens.size() - 1) +
                                          " fields, more than the " +
                                          std::to_string(cells + header.trailing.size()) + " columns of the header");
    p.row_line[r] = line_no;
    for (int c = 0; c < header.gpu_count; ++c)
      p.links[r].push_back(parse_cell(tokens[1 + static_cast<std::size_t>(c)], source, line_no, line, row, c));
    GpuInfo& g = p.gpus[r];
    g.local_index = row;
    for (std::size_t f = 0; f + 1 + cells < tokens.size(); ++f) {
      const std::string& v = tokens[1 + cells + f];
      switch (header.trailing[f]) {
        case Trailing::CpuAffinity:
          if (v != "N/A") {
            try {
              (void)parse_cpu_list(v);
            } catch (const Error&) {
              bad_line(source, line_no, line, "CPU affinity '" + v + "' is not a CPU list");
            }
            g.cpu_affinity = v;
          }
          break;
        case Trailing::NumaAffinity:
          if (v != "N/A") {
            bool digits = !v.empty() && v.size() < 6;
            for (char ch : v) digits = digits && std::isdigit(static_cast<unsigned char>(ch));
            if (!digits) bad_line(source, line_no, line, "NUMA affinity '" + v + "' is not a number");
            g.numa_node = std::stoi(v);
          }
          break;
        case Trailing::GpuNumaId: break;
      }
    }
  }
  if (!have_header) bad_line(source, last_line, "", "no `nvidia-smi topo -m` matrix header (GPU0 ...) found");
  for (int r = 0; r < header.gpu_count; ++r)
    if (p.row_line[static_cast<std::size_t>(r)] == 0)
      bad_line(source, last_line, "", "no row for GPU" + std::to_string(r));
  const int n = header.gpu_count;
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      const Link& a = p.links[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
      const Link& b = p.links[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)];
      if (a.kind != b.kind || a.nvlinks != b.nvlinks)
        bad_line(source, p.row_line[static_cast<std::size_t>(j)], lines[static_cast<std::size_t>(
                                                                       p.row_line[static_cast<std::size_t>(j)] -
                                                                       first_line)],
                 "GPU" + std::to_string(j) + "-GPU" + std::to_string(i) + " does not match GPU" + std::to_string(i) +
                     "-GPU" + std::to_string(j));
    }
  // NVSwitch: every pair shows the same NV# and that many links could not go to every peer
  // directly. No GPU has more than 18 NVLinks, and none wires all 18 to one peer, so NV18 on a
  // pair (two GPUs of an HGX board) is also NVSwitch.
  int max_links = 0;
  bool uniform_nvlink = n >= 2;
  const int first_count = n >= 2 ? p.links[0][1].nvlinks : 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      const Link& l = p.links[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
      max_links = std::max(max_links, l.nvlinks);
      uniform_nvlink = uniform_nvlink && l.kind == LinkKind::NVLink && l.nvlinks == first_count;
    }
  const bool nvswitch = uniform_nvlink && first_count * (n - 1) >= 18;
  TopologyEstimates est = est_in;
  if (est.pcie_gbps <= 0) est.pcie_gbps = max_links >= 18 ? 50.0 : 25.0;
  for (auto& row : p.links)
    for (Link& l : row) {
      if (nvswitch && l.kind == LinkKind::NVLink) l.kind = LinkKind::NVSwitch;
      l.gbps = estimate_link_gbps(l.kind, l.nvlinks, est);
    }
  return Topology(std::move(p.gpus), std::move(p.links), {nvswitch}, source);
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::string cur;
  for (char c : text) {
    if (c == '\n') {
      if (!cur.empty() && cur.back() == '\r') cur.pop_back();
      lines.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) lines.push_back(cur);
  return lines;
}

// "# node 3" -> 3, else -1.
int node_section_index(const std::string& line) {
  const auto tokens = split_ws(line);
  if (tokens.size() != 3 || tokens[0] != "#" || tokens[1] != "node") return -1;
  for (char c : tokens[2])
    if (!std::isdigit(static_cast<unsigned char>(c))) return -1;
  return tokens[2].size() < 6 ? std::stoi(tokens[2]) : -1;
}

std::string read_file_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) DSTRAIN_THROW(ErrorCode::Io, "cannot open '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

Topology combine_nodes_named(const std::vector<Topology>& nodes, double network_gbps, const std::string& source);

}  // namespace

Topology parse_nvidia_smi_topo(const std::string& text, const TopologyEstimates& est, const std::string& source) {
  return parse_one_node(split_lines(text), 1, est, source);
}

Topology parse_topology_text(const std::string& text, const TopologyEstimates& est, const std::string& source) {
  const auto lines = split_lines(text);
  std::vector<std::size_t> starts;
  for (std::size_t k = 0; k < lines.size(); ++k) {
    const int idx = node_section_index(lines[k]);
    if (idx < 0) continue;
    if (idx != static_cast<int>(starts.size()))
      bad_line(source, static_cast<int>(k) + 1, lines[k],
               "node sections must be numbered 0, 1, ... in order; expected '# node " + std::to_string(starts.size()) +
                   "'");
    starts.push_back(k);
  }
  if (starts.empty()) return parse_one_node(lines, 1, est, source);
  for (std::size_t k = 0; k < starts[0]; ++k) {
    const std::string t = trim(lines[k]);
    if (!t.empty() && t[0] != '#')
      bad_line(source, static_cast<int>(k) + 1, lines[k], "text before the first '# node 0' section");
  }
  std::vector<Topology> nodes;
  for (std::size_t s = 0; s < starts.size(); ++s) {
    const std::size_t b = starts[s] + 1, e = s + 1 < starts.size() ? starts[s + 1] : lines.size();
    std::vector<std::string> section(lines.begin() + static_cast<std::ptrdiff_t>(b),
                                     lines.begin() + static_cast<std::ptrdiff_t>(e));
    nodes.push_back(parse_one_node(section, static_cast<int>(b) + 1, est, source));
  }
  return combine_nodes_named(nodes, est.network_gbps, source);
}

Topology load_topology_file(const std::string& path, const TopologyEstimates& est) {
  return parse_topology_text(read_file_text(path), est, path);
}

Topology combine_nodes(const std::vector<Topology>& nodes, double network_gbps) {
  return combine_nodes_named(nodes, network_gbps, "combined");
}

namespace {

Topology combine_nodes_named(const std::vector<Topology>& nodes, double network_gbps, const std::string& source) {
  std::vector<GpuInfo> gpus;
  std::vector<bool> nvswitch;
  std::vector<int> offset;
  for (std::size_t k = 0; k < nodes.size(); ++k) {
    DSTRAIN_CHECK(nodes[k].node_count() == 1, "combine_nodes: part " + std::to_string(k) + " already has " +
                                                  std::to_string(nodes[k].node_count()) + " nodes");
    offset.push_back(static_cast<int>(gpus.size()));
    for (int i = 0; i < nodes[k].gpu_count(); ++i) {
      GpuInfo g = nodes[k].gpu(i);
      g.node = static_cast<int>(k);
      gpus.push_back(g);
    }
    nvswitch.push_back(nodes[k].has_nvswitch(0));
  }
  const std::size_t n = gpus.size();
  std::vector<std::vector<Link>> links(n, std::vector<Link>(n));
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      const int ni = gpus[i].node, nj = gpus[j].node;
      if (ni == nj) {
        links[i][j] = nodes[static_cast<std::size_t>(ni)].link(static_cast<int>(i) - offset[static_cast<std::size_t>(ni)],
                                                               static_cast<int>(j) - offset[static_cast<std::size_t>(nj)]);
      } else {
        links[i][j] = Link{LinkKind::Network, 0, network_gbps};
      }
    }
  return Topology(std::move(gpus), std::move(links), std::move(nvswitch), source);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Live discovery

Topology topology_from_nvidia_smi(const TopologyEstimates& est) {
  // A stuck driver must not hang the job: coreutils' timeout bounds the command when present.
  const char* command =
      "if command -v timeout >/dev/null 2>&1; then timeout 30 nvidia-smi topo -m; else nvidia-smi topo -m; fi 2>&1";
  FILE* pipe = ::popen(command, "r");
  if (!pipe) DSTRAIN_THROW(ErrorCode::Unsupported, "cannot start `nvidia-smi topo -m`");
  std::string text;
  char buf[4096];
  for (std::size_t got; (got = std::fread(buf, 1, sizeof buf, pipe)) > 0;) text.append(buf, got);
  const int status = ::pclose(pipe);
  const int code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  if (code == 127) DSTRAIN_THROW(ErrorCode::Unsupported, "nvidia-smi not found on PATH: cannot read the GPU topology");
  if (code == 124) DSTRAIN_THROW(ErrorCode::Timeout, "`nvidia-smi topo -m` did not finish within 30 s");
  if (code != 0)
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  "`nvidia-smi topo -m` failed with exit code " + std::to_string(code) + ": " + trim(text));
  return parse_nvidia_smi_topo(text, est, "nvidia-smi");
}

Topology discover_topology(const TopologyEstimates& est) {
#if DSTRAIN_HAVE_CUDA
  if (cuda_device_count() == 0) return Topology();
  std::string why;
  try {
    return detail::discover_topology_nvml(est);
  } catch (const Error& e) {
    why = e.what();
  }
  try {
    Topology t = topology_from_nvidia_smi(est);
    if (t.gpu_count() == cuda_device_count()) return t;
    why += "; nvidia-smi shows " + std::to_string(t.gpu_count()) + " GPUs but CUDA sees " +
           std::to_string(cuda_device_count());
  } catch (const Error& e) {
    why += std::string("; ") + e.what();
  }
  detail::log_warning("GPU topology from CUDA alone (link kinds are rough): " + why);
  try {
    return detail::discover_topology_cuda(est);
  } catch (const Error& e) {
    detail::log_warning(std::string("GPU topology discovery failed: ") + e.what());
    return Topology();
  }
#else
  // Without CUDA the job cannot use GPUs; nvidia-smi still describes the machine when present.
  try {
    return topology_from_nvidia_smi(est);
  } catch (const Error&) {
    return Topology();
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// CPU placement

std::vector<int> parse_cpu_list(const std::string& text) {
  std::vector<int> cpus;
  std::string item;
  std::istringstream in(text);
  auto bad = [&](const std::string& why) {
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "CPU list '" + text + "': " + why);
  };
  auto number = [&](const std::string& s) {
    const std::string t = trim(s);
    if (t.empty() || t.size() > 7) bad("'" + s + "' is not a CPU number");
    for (char c : t)
      if (!std::isdigit(static_cast<unsigned char>(c))) bad("'" + s + "' is not a CPU number");
    return std::stoi(t);
  };
  while (std::getline(in, item, ',')) {
    if (trim(item).empty()) {
      if (trim(text).empty()) break;
      bad("empty item");
    }
    const auto dash = item.find('-');
    if (dash == std::string::npos) {
      cpus.push_back(number(item));
    } else {
      const int lo = number(item.substr(0, dash)), hi = number(item.substr(dash + 1));
      if (hi < lo) bad("range '" + trim(item) + "' runs backwards");
      for (int c = lo; c <= hi; ++c) cpus.push_back(c);
    }
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

bool bind_to_cpus(const std::vector<int>& cpus) {
  cpu_set_t current;
  CPU_ZERO(&current);
  if (sched_getaffinity(0, sizeof current, &current) != 0) {
    detail::log_warning("sched_getaffinity failed; CPU affinity left as it is");
    return false;
  }
  cpu_set_t wanted;
  CPU_ZERO(&wanted);
  int count = 0;
  for (int c : cpus)
    if (c >= 0 && c < CPU_SETSIZE && CPU_ISSET(c, &current)) CPU_SET(c, &wanted), ++count;
  if (count == 0) {
    detail::log_warning("none of the GPU's local CPU cores is allowed to this process; CPU affinity left as it is");
    return false;
  }
  if (sched_setaffinity(0, sizeof wanted, &wanted) != 0) {
    detail::log_warning("sched_setaffinity failed; CPU affinity left as it is");
    return false;
  }
  return true;
}

bool bind_to_gpu_numa_cores(int device) {
  if (const char* env = std::getenv("DSTRAIN_BIND_CPU"); env && std::string(env) == "0") return false;
#if DSTRAIN_HAVE_CUDA
  try {
    std::vector<int> cpus = detail::nvml_cpu_affinity(device);
    if (cpus.empty()) {
      const std::string path = "/sys/bus/pci/devices/" + detail::cuda_pci_bus_id(device) + "/local_cpulist";
      std::ifstream in(path);
      std::string list;
      if (!in || !std::getline(in, list)) {
        detail::log_warning("cannot read " + path + "; CPU affinity left as it is");
        return false;
      }
      cpus = parse_cpu_list(list);
    }
    return bind_to_cpus(cpus);
  } catch (const Error& e) {
    detail::log_warning(std::string("binding to GPU ") + std::to_string(device) +
                        "'s NUMA-local cores failed: " + e.what());
    return false;
  }
#else
  detail::log_warning("bind_to_gpu_numa_cores(" + std::to_string(device) + "): built without CUDA");
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Cost model

namespace {

// Intra-node ring bottleneck and the slowest NVLink pair of a node.
struct NodeRing {
  std::vector<int> order;
  double bottleneck = 0.0;
  double sum = 0.0;
};

double ring_min(const Topology& t, const std::vector<int>& order, double* sum) {
  double lo = std::numeric_limits<double>::infinity(), s = 0.0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const double bw = t.link(order[k], order[(k + 1) % order.size()]).gbps;
    lo = std::min(lo, bw);
    s += bw;
  }
  if (sum) *sum = s;
  return lo;
}

NodeRing best_ring(const Topology& t, std::vector<int> ids) {
  NodeRing best;
  if (ids.size() <= 1) {
    best.order = ids;
    return best;
  }
  constexpr std::size_t kExactLimit = 8;
  if (ids.size() <= kExactLimit) {
    // Fix the first GPU and try every order of the others.
    std::sort(ids.begin() + 1, ids.end());
    bool first = true;
    do {
      double sum = 0.0;
      const double lo = ring_min(t, ids, &sum);
      if (first || lo > best.bottleneck + 1e-9 || (std::abs(lo - best.bottleneck) <= 1e-9 && sum > best.sum + 1e-9)) {
        best.order = ids;
        best.bottleneck = lo;
        best.sum = sum;
        first = false;
      }
    } while (std::next_permutation(ids.begin() + 1, ids.end()));
    return best;
  }
  // Greedy: from the first GPU, always step to the fastest unvisited one.
  std::vector<int> order{ids[0]};
  std::vector<bool> used(ids.size(), false);
  used[0] = true;
  for (std::size_t step = 1; step < ids.size(); ++step) {
    std::size_t pick = 0;
    double pick_bw = -1.0;
    for (std::size_t k = 0; k < ids.size(); ++k)
      if (!used[k] && t.link(order.back(), ids[k]).gbps > pick_bw) pick = k, pick_bw = t.link(order.back(), ids[k]).gbps;
    used[pick] = true;
    order.push_back(ids[pick]);
  }
  best.order = order;
  best.bottleneck = ring_min(t, order, &best.sum);
  return best;
}

double min_pair_gbps(const Topology& t, const std::vector<int>& ids) {
  double lo = std::numeric_limits<double>::infinity();
  for (int a : ids)
    for (int b : ids)
      if (a != b) lo = std::min(lo, t.link(a, b).gbps);
  return lo;
}

}  // namespace

void CostModel::set(AllreduceAlgo algo, AlgoCost cost) {
  DSTRAIN_CHECK(algo != AllreduceAlgo::Auto, "cost model: 'auto' is not an algorithm");
  DSTRAIN_CHECK(cost.alpha_us >= 0 && std::isfinite(cost.alpha_us), "cost model: alpha must be >= 0");
  DSTRAIN_CHECK(cost.beta_gbps > 0 && std::isfinite(cost.beta_gbps), "cost model: beta must be > 0");
  costs_[algo] = cost;
}

const AlgoCost& CostModel::get(AllreduceAlgo algo) const {
  const auto it = costs_.find(algo);
  if (it == costs_.end())
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string("cost model has no entry for ") + allreduce_algo_name(algo));
  return it->second;
}

double CostModel::time_us(AllreduceAlgo algo, std::size_t bytes) const {
  const AlgoCost& c = get(algo);
  return c.alpha_us + static_cast<double>(bytes) / (c.beta_gbps * 1e3);
}

CostModel CostModel::merged_over(const CostModel& fallback) const {
  CostModel out = fallback;
  for (const auto& [algo, cost] : costs_) out.costs_[algo] = cost;
  return out;
}

CostModel CostModel::defaults_for(const Topology& topo, int ranks) {
  CostModel m;
  const int n = ranks > 0 ? ranks : topo.gpu_count();
  if (topo.gpu_count() == 0) {
    // MPI on host buffers: shared-memory or TCP transport; the ring moves 2(n-1)/n of the data.
    const double host_gbps = 5.0;
    m.set(AllreduceAlgo::Mpi, {30.0, n > 1 ? host_gbps * n / (2.0 * (n - 1)) : host_gbps});
    return m;
  }
  // Factors below: the share of the link bandwidth each algorithm reaches in practice.
  if (topo.node_count() > 1) {
    int g = 1;
    double intra = std::numeric_limits<double>::infinity();
    for (int k = 0; k < topo.node_count(); ++k) {
      const auto ids = topo.gpus_of_node(k);
      g = std::max(g, static_cast<int>(ids.size()));
      if (ids.size() > 1) intra = std::min(intra, best_ring(topo, ids).bottleneck);
    }
    double net = std::numeric_limits<double>::infinity();
    for (int i = 0; i < topo.gpu_count(); ++i)
      for (int j = 0; j < topo.gpu_count(); ++j)
        if (topo.gpu(i).node != topo.gpu(j).node) net = std::min(net, topo.link(i, j).gbps);
    const int nodes = topo.node_count();
    // Flat ring through the network: every byte crosses the slowest (network) hop.
    m.set(AllreduceAlgo::Nccl, {25.0, 0.85 * net * n / (2.0 * (n - 1))});
    // Reduce-scatter in the node, AllReduce of 1/g of the data between nodes (one NIC per GPU),
    // all-gather in the node.
    double inv = 2.0 * (nodes - 1) / (nodes * g * 0.9 * net);
    if (g > 1 && std::isfinite(intra)) inv += 2.0 * (g - 1) / (g * 0.8 * intra);
    m.set(AllreduceAlgo::Hierarchical, {40.0, 1.0 / inv});
    return m;
  }
  const auto ids = topo.gpus_of_node(0);
  if (n <= 1 || ids.size() <= 1) {
    // One GPU: nothing crosses a link; launch cost only.
    for (AllreduceAlgo a : {AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot, AllreduceAlgo::Nccl})
      m.set(a, {a == AllreduceAlgo::Nccl ? 10.0 : 5.0, 1000.0});
    return m;
  }
  const double ring_bw = best_ring(topo, ids).bottleneck;
  m.set(AllreduceAlgo::Nccl, {20.0, 0.85 * ring_bw * n / (2.0 * (n - 1))});
  if (topo.all_pairs_nvlink(0)) {
    // Through NVSwitch a GPU's links are shared by all its peers; with direct links each peer has
    // its own.
    const double aggregate = topo.has_nvswitch(0) ? ring_bw : (n - 1) * min_pair_gbps(topo, ids);
    m.set(AllreduceAlgo::OneShot, {6.0, 0.9 * aggregate / (n - 1)});
    m.set(AllreduceAlgo::TwoShot, {10.0, 0.75 * aggregate * n / (2.0 * (n - 1))});
  }
  return m;
}

CostModel CostModel::parse(const std::string& text, const std::string& origin) {
  CostModel m;
  const auto lines = split_lines(text);
  for (std::size_t k = 0; k < lines.size(); ++k) {
    std::string t = lines[k];
    if (const auto hash = t.find('#'); hash != std::string::npos) t.resize(hash);
    const auto tokens = split_ws(t);
    if (tokens.empty()) continue;
    const int line_no = static_cast<int>(k) + 1;
    if (tokens.size() != 3) bad_line(origin, line_no, lines[k], "expected `<algorithm> <alpha_us> <beta_GBps>`");
    AllreduceAlgo algo;
    try {
      algo = parse_allreduce_algo(tokens[0]);
    } catch (const Error& e) {
      bad_line(origin, line_no, lines[k], e.what());
    }
    if (algo == AllreduceAlgo::Auto) bad_line(origin, line_no, lines[k], "'auto' is not an algorithm");
    AlgoCost c;
    try {
      std::size_t used_a = 0, used_b = 0;
      c.alpha_us = std::stod(tokens[1], &used_a);
      c.beta_gbps = std::stod(tokens[2], &used_b);
      if (used_a != tokens[1].size() || used_b != tokens[2].size()) throw std::invalid_argument("trailing");
    } catch (const std::exception&) {
      bad_line(origin, line_no, lines[k], "alpha and beta must be numbers");
    }
    if (!(c.alpha_us >= 0) || !std::isfinite(c.alpha_us) || !(c.beta_gbps > 0) || !std::isfinite(c.beta_gbps))
      bad_line(origin, line_no, lines[k], "alpha must be >= 0 and beta > 0");
    m.costs_[algo] = c;
  }
  return m;
}

CostModel CostModel::load(const std::string& path) { return parse(read_file_text(path), path); }

std::string CostModel::to_text() const {
  std::ostringstream out;
  out << "# AllReduce cost model: <algorithm> <alpha_us> <beta_GBps>; time_us = alpha + bytes / (beta * 1e3)\n";
  out << std::setprecision(6);
  for (const auto& [algo, c] : costs_) out << allreduce_algo_name(algo) << " " << c.alpha_us << " " << c.beta_gbps << "\n";
  return out.str();
}

void CostModel::save(const std::string& path) const {
  std::ofstream out(path, std::ios::trunc);
  if (!out) DSTRAIN_THROW(ErrorCode::Io, "cannot write cost model '" + path + "'");
  out << to_text();
  out.flush();
  if (!out) DSTRAIN_THROW(ErrorCode::Io, "writing cost model '" + path + "' failed");
}

// ---------------------------------------------------------------------------------------------
// Planner

bool Plan::is_available(AllreduceAlgo algo) const {
  return std::find(available.begin(), available.end(), algo) != available.end();
}

AllreduceAlgo Plan::auto_algo(std::size_t bytes) const {
  DSTRAIN_CHECK(!ranges.empty(), "AllReduce plan has no size ranges");
  AllreduceAlgo algo = ranges.front().algo;
  for (const SizeRange& r : ranges)
    if (bytes >= r.min_bytes) algo = r.algo;
  return algo;
}

namespace {

std::string format_bytes(std::size_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 4) v /= 1024.0, ++u;
  std::ostringstream s;
  s << std::setprecision(v < 10 && u > 0 ? 3 : 4) << v << " " << units[u];
  return s.str();
}

}  // namespace

std::string Plan::describe() const {
  std::ostringstream out;
  if (gpu_count == 0) {
    out << "AllReduce plan: CPU job\n";
  } else {
    out << "AllReduce plan: " << gpu_count << " GPU(s) on " << node_count << " node(s)\n";
    out << "ring:";
    for (int g : ring) out << " " << g;
    if (ring.size() > 1) out << " " << ring.front();
    out << "\nbottleneck: " << format_gbps(bottleneck_gbps) << " GB/s\n";
  }
  out << "available:";
  for (AllreduceAlgo a : available) out << " " << allreduce_algo_name(a);
  out << "\n" << std::left << std::setw(28) << "message size" << std::setw(14) << "algorithm"
      << "est. time at range start\n";
  for (std::size_t k = 0; k < ranges.size(); ++k) {
    const std::string upto = k + 1 < ranges.size() ? format_bytes(ranges[k + 1].min_bytes) : std::string("and up");
    const std::string span = format_bytes(ranges[k].min_bytes) + " .. " + upto;
    out << std::setw(28) << span << std::setw(14) << allreduce_algo_name(ranges[k].algo) << std::fixed
        << std::setprecision(1) << cost.time_us(ranges[k].algo, ranges[k].min_bytes) << " us\n";
    out.unsetf(std::ios::fixed);
  }
  out << std::right << std::setprecision(4) << "cost model (alpha_us beta_GBps):";
  for (AllreduceAlgo a : available)
    if (cost.has(a)) out << "  " << allreduce_algo_name(a) << " " << cost.get(a).alpha_us << " " << cost.get(a).beta_gbps;
  out << "\n";
  return out.str();
}

Plan make_plan(const Topology& topo, const CostModel& given) {
  Plan plan;
  plan.gpu_count = topo.gpu_count();
  plan.node_count = std::max(1, topo.node_count());
  plan.cost = given.merged_over(CostModel::defaults_for(topo));
  if (topo.gpu_count() == 0) {
    plan.available = {AllreduceAlgo::Mpi};
  } else {
    double bottleneck = std::numeric_limits<double>::infinity();
    for (int k = 0; k < topo.node_count(); ++k) {
      const NodeRing r = best_ring(topo, topo.gpus_of_node(k));
      plan.ring.insert(plan.ring.end(), r.order.begin(), r.order.end());
      if (r.order.size() > 1) bottleneck = std::min(bottleneck, r.bottleneck);
    }
    if (topo.node_count() > 1) bottleneck = std::min(bottleneck, ring_min(topo, plan.ring, nullptr));
    plan.bottleneck_gbps = std::isfinite(bottleneck) ? bottleneck : 0.0;
    if (topo.node_count() > 1)
      plan.available = {AllreduceAlgo::Nccl, AllreduceAlgo::Hierarchical};
    else if (topo.all_pairs_nvlink(0))
      plan.available = {AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot, AllreduceAlgo::Nccl};
    else
      plan.available = {AllreduceAlgo::Nccl};
  }
  // Lower envelope of the lines time = alpha + bytes / beta: the cheapest algorithm can change
  // only where two lines cross.
  std::vector<AllreduceAlgo> algos;
  for (AllreduceAlgo a : plan.available)
    if (plan.cost.has(a)) algos.push_back(a);
  DSTRAIN_CHECK(!algos.empty(), "AllReduce cost model has no entry for any algorithm available here");
  std::vector<double> cuts{0.0};
  for (AllreduceAlgo a : algos)
    for (AllreduceAlgo b : algos) {
      const AlgoCost &ca = plan.cost.get(a), &cb = plan.cost.get(b);
      const double slope = 1.0 / (ca.beta_gbps * 1e3) - 1.0 / (cb.beta_gbps * 1e3);
      if (slope <= 0) continue;
      const double x = (cb.alpha_us - ca.alpha_us) / slope;
      if (x > 0 && x < 1e15) cuts.push_back(std::ceil(x));
    }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  for (std::size_t k = 0; k < cuts.size(); ++k) {
    const double probe = k + 1 < cuts.size() ? 0.5 * (cuts[k] + cuts[k + 1]) : 2.0 * cuts[k] + 1.0;
    AllreduceAlgo best = algos.front();
    double best_t = std::numeric_limits<double>::infinity();
    for (AllreduceAlgo a : algos) {
      const AlgoCost& c = plan.cost.get(a);
      const double t = c.alpha_us + probe / (c.beta_gbps * 1e3);
      if (t < best_t - 1e-12) best = a, best_t = t;
    }
    if (plan.ranges.empty() || plan.ranges.back().algo != best)
      plan.ranges.push_back({static_cast<std::size_t>(cuts[k]), best});
  }
  return plan;
}

Plan make_plan(const Topology& topo) {
  const char* env = std::getenv("DSTRAIN_ALLREDUCE_COST_MODEL");
  if (env && *env) return make_plan(topo, CostModel::load(env));
  return make_plan(topo, CostModel());
}

AllreduceAlgo choose_allreduce_algo(const Plan& plan, std::size_t bytes) {
  const AllreduceAlgo forced = allreduce_algo_from_env();
  if (forced != AllreduceAlgo::Auto) {
    if (plan.is_available(forced)) return forced;
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      std::string avail;
      for (AllreduceAlgo a : plan.available) avail += std::string(" ") + allreduce_algo_name(a);
      detail::log_warning(std::string("DSTRAIN_ALLREDUCE_ALGO=") + allreduce_algo_name(forced) +
                          " cannot run on this topology (available:" + avail + "); using the planner's choice");
    }
  }
  return plan.auto_algo(bytes);
}

}  // namespace dstrain
