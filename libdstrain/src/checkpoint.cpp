#include "dstrain/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <future>
#include <sstream>
#include <thread>

#include "dstrain/error.h"
#include "kernels/cuda_api.h"

namespace dstrain {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// CRC-32C: the SSE4.2 instruction where the CPU has it (several GB/s, so the checksum never
// limits the write), else a table.

namespace {

std::uint32_t crc32c_table_entry(std::uint32_t i) {
  std::uint32_t c = i;
  for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  return c;
}

std::uint32_t crc32c_software(const unsigned char* p, std::size_t n, std::uint32_t crc) {
  static const auto table = [] {
    std::vector<std::uint32_t> t(256);
    for (std::uint32_t i = 0; i < 256; ++i) t[i] = crc32c_table_entry(i);
    return t;
  }();
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(const unsigned char* p, std::size_t n,
                                                               std::uint32_t crc) {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n > 0) {
    c32 = __builtin_ia32_crc32qi(c32, *p);
    ++p;
    --n;
  }
  return c32;
}
bool cpu_has_sse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#endif

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t bytes, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  if (cpu_has_sse42()) return ~crc32c_sse42(p, bytes, crc);
#endif
  return ~crc32c_software(p, bytes, crc);
}

// ---------------------------------------------------------------------------------------------
// state.bin layout (little-endian):
//   FileHeader, then per section: SectionHeader, dims (int64 x ndim), name, padding to 64 bytes,
//   data, padding to 64 bytes. Section data starts 64-byte aligned within the file.

namespace {

constexpr char kMagic[8] = {'D', 'S', 'T', 'R', 'C', 'K', 'P', 'T'};
constexpr std::size_t kAlign = 64;
constexpr const char* kStateFile = "state.bin";
constexpr const char* kManifestFile = "MANIFEST";
constexpr const char* kManifestMagic = "dstrain-checkpoint";

struct FileHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t world_size;
  std::uint64_t step;
  std::uint64_t section_count;
};
static_assert(sizeof(FileHeader) == 32, "packed header");

enum class SectionKind : std::uint8_t { Replicated = 0, PerRank = 1, Blob = 2 };

struct SectionHeader {
  std::uint32_t name_len;
  std::uint8_t kind;
  std::uint8_t dtype;
  std::uint8_t policy;
  std::uint8_t ndim;
  std::int32_t rank;  // -1 for replicated sections
  std::uint32_t reserved;
  std::uint64_t nbytes;
};
static_assert(sizeof(SectionHeader) == 24, "packed header");

std::size_t align_up(std::size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Section {
  std::string name;
  SectionKind kind;
  DType dtype;
  OnWorldSizeChange policy;
  int rank;
  Shape shape;
  std::uint64_t nbytes;
  std::size_t data_offset;  // within the file image
};

std::size_t section_header_bytes(const std::string& name, std::size_t ndim) {
  return align_up(sizeof(SectionHeader) + ndim * sizeof(std::int64_t) + name.size());
}

// Writes a section header at image + offset; returns the offset of its data.
std::size_t put_section_header(char* image, std::size_t offset, const Section& s) {
  SectionHeader h{};
  h.name_len = static_cast<std::uint32_t>(s.name.size());
  h.kind = static_cast<std::uint8_t>(s.kind);
  h.dtype = static_cast<std::uint8_t>(s.dtype);
  h.policy = static_cast<std::uint8_t>(s.policy);
  h.ndim = static_cast<std::uint8_t>(s.shape.size());
  h.rank = s.rank;
  h.nbytes = s.nbytes;
  const std::size_t start = offset;
  std::memcpy(image + offset, &h, sizeof(h));
  offset += sizeof(h);
  for (std::int64_t d : s.shape) {
    std::memcpy(image + offset, &d, sizeof(d));
    offset += sizeof(d);
  }
  std::memcpy(image + offset, s.name.data(), s.name.size());
  const std::size_t data = start + section_header_bytes(s.name, s.shape.size());
  std::memset(image + offset + s.name.size(), 0, data - offset - s.name.size());
  return data;
}

[[noreturn]] void corrupt(const std::string& file, const std::string& why) {
  DSTRAIN_THROW(ErrorCode::Corrupt, "checkpoint file " + file + ": " + why);
}

// Parses and bounds-checks every section of a state.bin image.
std::vector<Section> parse_sections(const char* image, std::size_t size, const std::string& file,
                                    FileHeader& header) {
  if (size < sizeof(FileHeader)) corrupt(file, "truncated: " + std::to_string(size) + " bytes, no header");
  std::memcpy(&header, image, sizeof(header));
  if (std::memcmp(header.magic, kMagic, sizeof(kMagic)) != 0) corrupt(file, "not a dstrain checkpoint (bad magic)");
  if (header.version != kCheckpointFormatVersion)
    DSTRAIN_THROW(ErrorCode::Unsupported, "checkpoint file " + file + ": format version " +
                                              std::to_string(header.version) + ", this build reads version " +
                                              std::to_string(kCheckpointFormatVersion));
  std::vector<Section> out;
  std::size_t offset = align_up(sizeof(FileHeader));
  for (std::uint64_t i = 0; i < header.section_count; ++i) {
    SectionHeader h;
    if (offset + sizeof(h) > size) corrupt(file, "truncated in the header of section " + std::to_string(i));
    std::memcpy(&h, image + offset, sizeof(h));
    const std::size_t meta = sizeof(h) + h.ndim * sizeof(std::int64_t) + h.name_len;
    if (offset + meta > size) corrupt(file, "truncated in the header of section " + std::to_string(i));
    if (h.kind > 2 || h.dtype > static_cast<std::uint8_t>(DType::I32) || h.policy > 2)
      corrupt(file, "section " + std::to_string(i) + " has an unknown kind, dtype or policy");
    Section s;
    s.kind = static_cast<SectionKind>(h.kind);
    s.dtype = static_cast<DType>(h.dtype);
    s.policy = static_cast<OnWorldSizeChange>(h.policy);
    s.rank = h.rank;
    s.nbytes = h.nbytes;
    s.shape.resize(h.ndim);
    std::memcpy(s.shape.data(), image + offset + sizeof(h), h.ndim * sizeof(std::int64_t));
    s.name.assign(image + offset + sizeof(h) + h.ndim * sizeof(std::int64_t), h.name_len);
    s.data_offset = offset + section_header_bytes(s.name, s.shape.size());
    if (s.kind != SectionKind::Blob) {
      std::int64_t numel = 1;
      for (std::int64_t d : s.shape) {
        if (d < 0) corrupt(file, "section '" + s.name + "' has a negative dimension");
        numel *= d;
      }
      if (static_cast<std::uint64_t>(numel) * dtype_size(s.dtype) != s.nbytes)
        corrupt(file, "section '" + s.name + "' size disagrees with its shape");
    }
    if (s.data_offset > size || s.nbytes > size - s.data_offset)
      corrupt(file, "truncated in the data of section '" + s.name + "'");
    offset = s.data_offset + align_up(s.nbytes);
    out.push_back(std::move(s));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Files

std::string errno_text() { return std::strerror(errno); }

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  DSTRAIN_THROW(ErrorCode::Io, what + " " + path + ": " + errno_text());
}

class FileDescriptor {
 public:
  FileDescriptor(const std::string& path, int flags, mode_t mode = 0644) : path_(path) {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    if (fd_ < 0) io_error("cannot open", path);
  }
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }
  void write_all(const char* p, std::size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min<std::size_t>(n, std::size_t(1) << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        io_error("cannot write", path_);
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  void sync() {
    if (::fsync(fd_) != 0) io_error("cannot fsync", path_);
  }
  void close() {
    if (fd_ >= 0 && ::close(fd_) != 0) {
      fd_ = -1;
      io_error("cannot close", path_);
    }
    fd_ = -1;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

void fsync_dir(const std::string& path) {
  FileDescriptor d(path, O_RDONLY | O_DIRECTORY);
  d.sync();
}

std::vector<char> read_file(const std::string& path) {
  FileDescriptor f(path, O_RDONLY);
  struct stat st;
  if (::fstat(f.get(), &st) != 0) io_error("cannot stat", path);
  std::vector<char> bytes(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t r = ::read(f.get(), bytes.data() + got, bytes.size() - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      io_error("cannot read", path);
    }
    if (r == 0) break;
    got += static_cast<std::size_t>(r);
  }
  bytes.resize(got);
  return bytes;
}

// The fault-injection hook of the header: DSTRAIN_CHECKPOINT_FAULT=<point>[:<n>] kills the
// process at <point> of the n-th save of this process (default: the first).
void fault_point(const char* point, int save_index) {
  const char* env = std::getenv("DSTRAIN_CHECKPOINT_FAULT");
  if (!env || !*env) return;
  std::string spec = env;
  int wanted = 1;
  if (auto colon = spec.find(':'); colon != std::string::npos) {
    wanted = std::atoi(spec.c_str() + colon + 1);
    spec.resize(colon);
  }
  if (spec == point && save_index == wanted) {
    detail::log_warning(std::string("DSTRAIN_CHECKPOINT_FAULT: killing this process at '") + point +
                        "' of save " + std::to_string(save_index));
    ::kill(::getpid(), SIGKILL);
  }
}

std::string step_dir_name(std::int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%012lld", static_cast<long long>(step));
  return buf;
}

std::string hex32(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

// Text values in the manifest are single lines: newlines would break the format.
std::string one_line(const std::string& s) {
  std::string out = s;
  std::replace(out.begin(), out.end(), '\n', ' ');
  std::replace(out.begin(), out.end(), '\r', ' ');
  return out;
}

struct Manifest {
  std::uint32_t version = 0;
  std::int64_t step = 0, epoch = 0, step_in_epoch = 0;
  int world_size = 0;
  std::string model;
  std::map<std::string, std::string> metadata;
  std::uint64_t state_bytes = 0;
  std::uint32_t state_crc = 0;
};

std::string manifest_text(const Manifest& m) {
  std::ostringstream out;
  out << kManifestMagic << " " << m.version << "\n"
      << "step " << m.step << "\n"
      << "epoch " << m.epoch << "\n"
      << "step_in_epoch " << m.step_in_epoch << "\n"
      << "world_size " << m.world_size << "\n"
      << "model " << one_line(m.model) << "\n";
  for (const auto& [k, v] : m.metadata) out << "meta " << one_line(k) << " " << one_line(v) << "\n";
  out << "file " << kStateFile << " " << m.state_bytes << " " << hex32(m.state_crc) << "\n";
  std::string body = out.str();
  return body + "manifest_crc " + hex32(crc32c(body.data(), body.size())) + "\n";
}

Manifest parse_manifest(const std::string& text, const std::string& file) {
  const std::string key = "manifest_crc ";
  const auto pos = text.rfind(key);
  if (pos == std::string::npos || (pos > 0 && text[pos - 1] != '\n'))
    corrupt(file, "no manifest_crc line (truncated?)");
  const std::string body = text.substr(0, pos);
  std::string crc_text = text.substr(pos + key.size());
  while (!crc_text.empty() && (crc_text.back() == '\n' || crc_text.back() == '\r')) crc_text.pop_back();
  if (crc_text != hex32(crc32c(body.data(), body.size())))
    corrupt(file, "manifest checksum mismatch (the manifest is damaged)");
  Manifest m;
  std::istringstream in(body);
  std::string line;
  bool have_file = false, have_magic = false;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string k;
    ls >> k;
    if (k == kManifestMagic) {
      ls >> m.version;
      have_magic = true;
    } else if (k == "step") {
      ls >> m.step;
    } else if (k == "epoch") {
      ls >> m.epoch;
    } else if (k == "step_in_epoch") {
      ls >> m.step_in_epoch;
    } else if (k == "world_size") {
      ls >> m.world_size;
    } else if (k == "model") {
      m.model = line.size() > 6 ? line.substr(6) : "";
    } else if (k == "meta") {
      std::string mk;
      ls >> mk;
      const auto vpos = line.find(mk, 5) + mk.size();
      m.metadata[mk] = vpos < line.size() ? line.substr(vpos + 1) : "";
    } else if (k == "file") {
      std::string name, crc;
      ls >> name >> m.state_bytes >> crc;
      if (name != kStateFile) corrupt(file, "manifest names an unknown file '" + name + "'");
      m.state_crc = static_cast<std::uint32_t>(std::strtoul(crc.c_str(), nullptr, 16));
      have_file = true;
    }
  }
  if (!have_magic) corrupt(file, "not a dstrain manifest");
  if (m.version != kCheckpointFormatVersion)
    DSTRAIN_THROW(ErrorCode::Unsupported, "checkpoint " + file + ": format version " + std::to_string(m.version) +
                                              ", this build reads version " +
                                              std::to_string(kCheckpointFormatVersion));
  if (!have_file) corrupt(file, "manifest lists no state file");
  return m;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Checkpointer::Impl {
  struct Entry {
    std::string name;
    Tensor* tensor;
    bool per_rank;
    OnWorldSizeChange policy;
  };
  struct Blob {
    std::string name;
    std::function<std::vector<char>()> save;
    std::function<void(const std::vector<char>&)> load;
  };

  Runtime& rt;
  CheckpointOptions options;
  std::string model;
  std::map<std::string, std::string> metadata;
  std::vector<Entry> entries;
  std::vector<Blob> blobs;

  // The file image: pinned host memory on GPU runs so the device copies run at full speed.
  char* image = nullptr;
  std::size_t image_capacity = 0;
  bool image_pinned = false;

  std::thread writer;
  std::exception_ptr writer_error;
  SaveStats stats;
  double pending_write_s = 0;
  int saves_started = 0;
  std::chrono::steady_clock::time_point last_save = std::chrono::steady_clock::now();

  Impl(Runtime& r, CheckpointOptions o, std::string m) : rt(r), options(std::move(o)), model(std::move(m)) {}

  ~Impl() {
    join_writer();
    if (writer_error) {
      try {
        std::rethrow_exception(writer_error);
      } catch (const std::exception& e) {
        detail::log_warning(std::string("checkpoint write failed: ") + e.what());
      }
    }
    free_image();
  }

  void free_image() noexcept {
    if (!image) return;
    if (image_pinned)
      kernels::host_pinned_free(image);
    else
      std::free(image);
    image = nullptr;
    image_capacity = 0;
  }

  void ensure_image(std::size_t bytes) {
    if (bytes <= image_capacity) return;
    free_image();
    const std::size_t cap = align_up(bytes + bytes / 8);  // room for growing blobs
    image_pinned = rt.device().is_cuda();
    image = static_cast<char*>(image_pinned ? kernels::host_pinned_malloc(cap) : std::aligned_alloc(kAlign, cap));
    if (!image) DSTRAIN_THROW(ErrorCode::Io, "cannot allocate " + std::to_string(cap) + " bytes for a checkpoint");
    image_capacity = cap;
  }

  void join_writer() noexcept {
    if (writer.joinable()) writer.join();
    stats.write_s = pending_write_s;
  }

  void check_name(const std::string& name) const {
    DSTRAIN_CHECK(!name.empty() && name.find('\n') == std::string::npos, "checkpoint entry names are one line");
    for (const Entry& e : entries) DSTRAIN_CHECK(e.name != name, "checkpoint entry '" + name + "' registered twice");
    for (const Blob& b : blobs) DSTRAIN_CHECK(b.name != name, "checkpoint entry '" + name + "' registered twice");
  }

  // --- save -------------------------------------------------------------------------------

  // Every rank's per-rank tensors, gathered to every rank as raw bytes: [rank][entry bytes...].
  // An exact byte transport: int32 sums where each rank contributes only its own slot.
  std::vector<char> gather_per_rank(std::size_t& stride) {
    stride = 0;
    for (const Entry& e : entries)
      if (e.per_rank) stride += (e.tensor->nbytes() + 3) / 4 * 4;
    const int world = rt.world_size();
    if (stride == 0) return {};
    Tensor all = Tensor::zeros({static_cast<std::int64_t>(stride / 4) * world}, DType::I32, Device::cpu());
    char* mine = static_cast<char*>(all.data()) + stride * static_cast<std::size_t>(rt.rank());
    std::size_t off = 0;
    for (const Entry& e : entries) {
      if (!e.per_rank) continue;
      Tensor view = Tensor::wrap(mine + off, e.tensor->shape(), e.tensor->dtype(), Device::cpu());
      view.copy_from(*e.tensor);
      off += (e.tensor->nbytes() + 3) / 4 * 4;
    }
    if (world > 1) rt.host_comm().allreduce(all, ReduceOp::Sum, rt.context());
    std::vector<char> out(stride * static_cast<std::size_t>(world));
    std::memcpy(out.data(), all.data(), out.size());
    return out;
  }

  void save(const TrainProgress& progress) {
    const auto t0 = std::chrono::steady_clock::now();
    join_writer();
    const double waited = ms_since(t0);
    if (writer_error) {
      auto e = writer_error;
      writer_error = nullptr;
      std::rethrow_exception(e);
    }
    std::size_t stride = 0;
    const std::vector<char> per_rank = gather_per_rank(stride);
    const int world = rt.world_size();
    last_save = std::chrono::steady_clock::now();
    ++saves_started;
    if (!rt.is_root()) {
      stats.blocked_ms = ms_since(t0);
      stats.wait_previous_ms = waited;
      return;
    }

    // Layout.
    std::vector<std::vector<char>> blob_bytes;
    for (const Blob& b : blobs) blob_bytes.push_back(b.save());
    std::vector<Section> sections;
    for (const Entry& e : entries) {
      if (e.per_rank) continue;
      sections.push_back({e.name, SectionKind::Replicated, e.tensor->dtype(), OnWorldSizeChange::Refuse, -1,
                          e.tensor->shape(), e.tensor->nbytes(), 0});
    }
    for (int r = 0; r < world; ++r)
      for (const Entry& e : entries)
        if (e.per_rank)
          sections.push_back({e.name, SectionKind::PerRank, e.tensor->dtype(), e.policy, r, e.tensor->shape(),
                              e.tensor->nbytes(), 0});
    for (std::size_t i = 0; i < blobs.size(); ++i)
      sections.push_back({blobs[i].name, SectionKind::Blob, DType::I32, OnWorldSizeChange::Refuse, -1,
                          Shape{static_cast<std::int64_t>(blob_bytes[i].size())}, blob_bytes[i].size(), 0});
    std::size_t size = align_up(sizeof(FileHeader));
    for (Section& s : sections) {
      size += section_header_bytes(s.name, s.shape.size());
      s.data_offset = size;
      size += align_up(s.nbytes);
    }
    ensure_image(size);

    // Fill: headers, then device tensors copied on the context's stream, host data memcpy'd.
    FileHeader fh{};
    std::memcpy(fh.magic, kMagic, sizeof(kMagic));
    fh.version = kCheckpointFormatVersion;
    fh.world_size = static_cast<std::uint32_t>(world);
    fh.step = static_cast<std::uint64_t>(progress.step);
    fh.section_count = sections.size();
    std::memset(image, 0, align_up(sizeof(FileHeader)));
    std::memcpy(image, &fh, sizeof(fh));
    bool device_copies = false;
    std::size_t si = 0;
    for (const Entry& e : entries) {
      if (e.per_rank) continue;
      Section& s = sections[si++];
      put_section_header(image, s.data_offset - section_header_bytes(s.name, s.shape.size()), s);
      if (s.nbytes == 0) continue;
      if (e.tensor->is_cuda()) {
        kernels::memcpy_async(image + s.data_offset, e.tensor->data(), s.nbytes, rt.context().stream());
        device_copies = true;
      } else {
        std::memcpy(image + s.data_offset, e.tensor->data(), s.nbytes);
      }
      std::memset(image + s.data_offset + s.nbytes, 0, align_up(s.nbytes) - s.nbytes);
    }
    for (int r = 0; r < world; ++r) {
      std::size_t off = stride * static_cast<std::size_t>(r);
      for (const Entry& e : entries) {
        if (!e.per_rank) continue;
        Section& s = sections[si++];
        put_section_header(image, s.data_offset - section_header_bytes(s.name, s.shape.size()), s);
        std::memcpy(image + s.data_offset, per_rank.data() + off, s.nbytes);
        std::memset(image + s.data_offset + s.nbytes, 0, align_up(s.nbytes) - s.nbytes);
        off += (s.nbytes + 3) / 4 * 4;
      }
    }
    for (std::size_t i = 0; i < blobs.size(); ++i) {
      Section& s = sections[si++];
      put_section_header(image, s.data_offset - section_header_bytes(s.name, s.shape.size()), s);
      std::memcpy(image + s.data_offset, blob_bytes[i].data(), s.nbytes);
      std::memset(image + s.data_offset + s.nbytes, 0, align_up(s.nbytes) - s.nbytes);
    }
    if (device_copies) rt.context().synchronize();  // the only wait on the device: the copies

    Manifest m;
    m.version = kCheckpointFormatVersion;
    m.step = progress.step;
    m.epoch = progress.epoch;
    m.step_in_epoch = progress.step_in_epoch;
    m.world_size = world;
    m.model = model;
    m.metadata = metadata;
    m.state_bytes = size;
    stats.bytes = size;
    stats.blocked_ms = ms_since(t0);
    stats.wait_previous_ms = waited;
    const int save_index = saves_started;
    writer = std::thread([this, m, size, save_index]() mutable {
      const auto tw = std::chrono::steady_clock::now();
      try {
        write_checkpoint(m, size, save_index);
        pending_write_s = ms_since(tw) / 1000.0;  // until the checkpoint is durable
        prune();
      } catch (...) {
        writer_error = std::current_exception();
      }
    });
  }

  // Background thread, rank 0: temporary folder, state.bin, MANIFEST, fsync, rename, prune.
  void write_checkpoint(Manifest m, std::size_t size, int save_index) {
    const fs::path dir(options.dir);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) DSTRAIN_THROW(ErrorCode::Io, "cannot create checkpoint folder " + dir.string() + ": " + ec.message());
    const std::string name = step_dir_name(m.step);
    const fs::path tmp = dir / (".tmp-" + name);
    const fs::path final_path = dir / name;
    fs::remove_all(tmp, ec);
    if (!fs::create_directory(tmp, ec) || ec)
      DSTRAIN_THROW(ErrorCode::Io, "cannot create " + tmp.string() + ": " + ec.message());

    {
      const std::string path = (tmp / kStateFile).string();
      FileDescriptor f(path, O_WRONLY | O_CREAT | O_TRUNC);
      // The checksum runs beside the write (both only read the image), and writeback of each
      // chunk starts while the next is copied into the page cache, so the final fsync has
      // little left to do.
      std::future<std::uint32_t> crc = std::async(std::launch::async, [this, size] { return crc32c(image, size); });
      constexpr std::size_t kChunk = std::size_t(16) << 20;
      for (std::size_t off = 0; off < size; off += kChunk) {
        const std::size_t n = std::min(kChunk, size - off);
        f.write_all(image + off, n);
#if defined(__linux__)
        ::sync_file_range(f.get(), static_cast<off_t>(off), static_cast<off_t>(n), SYNC_FILE_RANGE_WRITE);
#endif
        if (off == 0) fault_point("data", save_index);
      }
      f.sync();
      f.close();
      m.state_crc = crc.get();
    }
    fault_point("manifest", save_index);
    {
      const std::string path = (tmp / kManifestFile).string();
      FileDescriptor f(path, O_WRONLY | O_CREAT | O_TRUNC);
      const std::string text = manifest_text(m);
      f.write_all(text.data(), text.size());
      f.sync();
      f.close();
    }
    fsync_dir(tmp.string());
    fault_point("rename", save_index);
    if (fs::exists(final_path)) fs::remove_all(final_path, ec);  // the same step saved again
    if (std::rename(tmp.c_str(), final_path.c_str()) != 0) io_error("cannot rename " + tmp.string() + " to", final_path.string());
    fsync_dir(dir.string());
  }

  void prune() {
    const std::vector<std::string> all = list();
    for (std::size_t i = static_cast<std::size_t>(std::max(options.keep, 1)); i < all.size(); ++i) {
      std::error_code ec;
      fs::remove_all(all[i], ec);
      if (ec) detail::log_warning("cannot remove old checkpoint " + all[i] + ": " + ec.message());
    }
  }

  std::vector<std::string> list() const {
    std::vector<std::pair<std::int64_t, std::string>> found;
    std::error_code ec;
    if (!fs::is_directory(options.dir, ec)) return {};
    for (const auto& item : fs::directory_iterator(options.dir, ec)) {
      const std::string n = item.path().filename().string();
      if (n.size() != 17 || n.compare(0, 5, "step-") != 0) continue;
      if (!std::all_of(n.begin() + 5, n.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
      found.emplace_back(std::stoll(n.substr(5)), item.path().string());
    }
    std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<std::string> out;
    for (auto& f : found) out.push_back(f.second);
    return out;
  }

  // --- restore ----------------------------------------------------------------------------

  // Rank 0: reads a checkpoint folder and checks it completely against this run.
  std::vector<char> read_checked(const std::string& path, Manifest& m) {
    const std::string manifest_path = (fs::path(path) / kManifestFile).string();
    const std::string state_path = (fs::path(path) / kStateFile).string();
    if (!fs::exists(manifest_path))
      DSTRAIN_THROW(ErrorCode::Io, "checkpoint " + path + " has no " + kManifestFile);
    const std::vector<char> text = read_file(manifest_path);
    m = parse_manifest(std::string(text.begin(), text.end()), manifest_path);
    std::vector<char> state = read_file(state_path);
    if (state.size() != m.state_bytes)
      corrupt(state_path, "truncated or extended: " + std::to_string(state.size()) + " bytes, the manifest says " +
                              std::to_string(m.state_bytes));
    if (crc32c(state.data(), state.size()) != m.state_crc)
      corrupt(state_path, "checksum mismatch (the file is damaged)");
    FileHeader fh;
    const std::vector<Section> sections = parse_sections(state.data(), state.size(), state_path, fh);
    if (static_cast<std::int64_t>(fh.step) != m.step || static_cast<int>(fh.world_size) != m.world_size)
      corrupt(state_path, "step or world size disagrees with the manifest");
    check_compatible(m, sections, state_path);
    return state;
  }

  void check_compatible(const Manifest& m, const std::vector<Section>& sections, const std::string& file) const {
    if (m.model != model)
      DSTRAIN_THROW(ErrorCode::InvalidArgument, "checkpoint file " + file + " is of another model: saved '" + m.model +
                                                    "', this run '" + model + "'");
    for (const auto& [k, v] : metadata) {
      auto it = m.metadata.find(k);
      const std::string saved = it == m.metadata.end() ? "(absent)" : it->second;
      if (saved != v)
        DSTRAIN_THROW(ErrorCode::InvalidArgument, "checkpoint file " + file + " was written with " + k + " = " + saved +
                                                      ", this run has " + k + " = " + v);
    }
    for (const Entry& e : entries) {
      bool found = false;
      for (const Section& s : sections) {
        if (s.name != e.name || s.kind == SectionKind::Blob) continue;
        if ((s.kind == SectionKind::PerRank) != e.per_rank || s.dtype != e.tensor->dtype() ||
            s.shape != e.tensor->shape())
          DSTRAIN_THROW(ErrorCode::InvalidArgument,
                        "checkpoint file " + file + " is of another model: '" + e.name + "' is " +
                            dtype_name(s.dtype) + " " + shape_str(s.shape) + " there, " +
                            dtype_name(e.tensor->dtype()) + " " + shape_str(e.tensor->shape()) + " here");
        found = true;
      }
      if (!found)
        DSTRAIN_THROW(ErrorCode::InvalidArgument,
                      "checkpoint file " + file + " is of another model: it has no '" + e.name + "'");
    }
    for (const Blob& b : blobs) {
      const bool found = std::any_of(sections.begin(), sections.end(), [&](const Section& s) {
        return s.kind == SectionKind::Blob && s.name == b.name;
      });
      if (!found) DSTRAIN_THROW(ErrorCode::InvalidArgument, "checkpoint file " + file + " has no '" + b.name + "'");
    }
  }

  // Rank 0 tells every rank which checkpoint it chose (or the error), then sends its bytes.
  // Status: 0 nothing found, 1 found, 2 error (message follows).
  TrainProgress distribute_and_apply(int status, ErrorCode error_code, const std::exception_ptr& root_error,
                                     const std::string& message, std::vector<char>& state, Manifest& m,
                                     const std::string& path) {
    Communicator& host = rt.host_comm();
    Context& ctx = rt.context();
    const bool multi = rt.world_size() > 1;
    auto bcast_string = [&](std::string& s) {
      Tensor len = Tensor::zeros({1}, DType::I32, Device::cpu());
      len.data_as<std::int32_t>()[0] = static_cast<std::int32_t>(s.size());
      if (multi) host.broadcast(len, 0, ctx);
      std::vector<std::int32_t> words((static_cast<std::size_t>(len.data_as<std::int32_t>()[0]) + 3) / 4);
      std::memcpy(words.data(), s.data(), std::min(s.size(), words.size() * 4));
      Tensor t = Tensor::wrap(words.data(), {static_cast<std::int64_t>(words.size())}, DType::I32, Device::cpu());
      if (multi && !words.empty()) host.broadcast(t, 0, ctx);
      s.assign(reinterpret_cast<const char*>(words.data()), static_cast<std::size_t>(len.data_as<std::int32_t>()[0]));
    };
    Tensor head = Tensor::zeros({4}, DType::I32, Device::cpu());
    auto* h = head.data_as<std::int32_t>();
    h[0] = status;
    h[3] = static_cast<std::int32_t>(error_code);
    h[1] = static_cast<std::int32_t>(state.size() & 0x7fffffff);
    h[2] = static_cast<std::int32_t>(state.size() >> 31);
    if (multi) host.broadcast(head, 0, ctx);
    std::string msg = message;
    if (h[0] == 2) {
      bcast_string(msg);
      if (root_error) std::rethrow_exception(root_error);  // rank 0: the error as raised
      detail::throw_error(static_cast<ErrorCode>(h[3]), "rank 0 refused the checkpoint: " + msg, __FILE__, __LINE__);
    }
    if (h[0] == 0) return TrainProgress{-1, 0, 0};
    std::string manifest = rt.is_root() ? manifest_text(m) : std::string();
    bcast_string(manifest);
    std::string where = path;
    bcast_string(where);
    const std::size_t size = static_cast<std::size_t>(h[1]) | (static_cast<std::size_t>(h[2]) << 31);
    if (!rt.is_root()) {
      m = parse_manifest(manifest, where + "/" + kManifestFile);
      state.assign((size + 3) / 4 * 4, 0);
    } else {
      state.resize((size + 3) / 4 * 4, 0);
    }
    if (multi) {
      Tensor t = Tensor::wrap(state.data(), {static_cast<std::int64_t>(state.size() / 4)}, DType::I32, Device::cpu());
      host.broadcast(t, 0, ctx);
    }
    FileHeader fh;
    const std::string state_path = where + "/" + kStateFile;
    const std::vector<Section> sections = parse_sections(state.data(), size, state_path, fh);
    apply(sections, state.data(), m, state_path);
    last_save = std::chrono::steady_clock::now();
    return TrainProgress{m.step, m.epoch, m.step_in_epoch};
  }

  void apply(const std::vector<Section>& sections, const char* image_bytes, const Manifest& m,
             const std::string& file) {
    const int world = rt.world_size(), rank = rt.rank();
    const bool resized = m.world_size != world;
    for (const Entry& e : entries) {
      if (!e.per_rank) continue;
      if (resized && e.policy == OnWorldSizeChange::Refuse)
        DSTRAIN_THROW(ErrorCode::InvalidArgument,
                      "checkpoint file " + file + " was written by " + std::to_string(m.world_size) +
                          " ranks; '" + e.name + "' is per-rank state that cannot move to " + std::to_string(world) +
                          " ranks");
    }
    if (resized && rank == 0)
      detail::log_warning("checkpoint " + file + " was written by " + std::to_string(m.world_size) +
                          " ranks, resuming on " + std::to_string(world) +
                          ": per-rank state is taken from saved rank 0 (or summed into rank 0)");
    auto load_into = [&](Tensor& dst, const char* src) {
      Tensor view = Tensor::wrap(const_cast<char*>(src), dst.shape(), dst.dtype(), Device::cpu());
      dst.copy_from(view);
    };
    for (const Entry& e : entries) {
      if (!e.per_rank) {
        for (const Section& s : sections)
          if (s.kind == SectionKind::Replicated && s.name == e.name) load_into(*e.tensor, image_bytes + s.data_offset);
        continue;
      }
      if (!resized || e.policy == OnWorldSizeChange::TakeRankZero) {
        const int want = resized ? 0 : rank;
        for (const Section& s : sections)
          if (s.kind == SectionKind::PerRank && s.name == e.name && s.rank == want)
            load_into(*e.tensor, image_bytes + s.data_offset);
        continue;
      }
      // SumToRankZero
      DSTRAIN_CHECK(e.tensor->dtype() == DType::F32, "SumToRankZero needs fp32 state: " + e.name);
      std::vector<float> acc(static_cast<std::size_t>(e.tensor->numel()), 0.0f);
      if (rank == 0)
        for (const Section& s : sections) {
          if (s.kind != SectionKind::PerRank || s.name != e.name) continue;
          const auto* v = reinterpret_cast<const float*>(image_bytes + s.data_offset);
          for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += v[i];
        }
      load_into(*e.tensor, reinterpret_cast<const char*>(acc.data()));
    }
    for (const Blob& b : blobs)
      for (const Section& s : sections)
        if (s.kind == SectionKind::Blob && s.name == b.name)
          b.load(std::vector<char>(image_bytes + s.data_offset, image_bytes + s.data_offset + s.nbytes));
    rt.context().synchronize();
  }

  std::optional<TrainProgress> restore_from(const std::vector<std::string>& candidates, bool fall_back) {
    join_writer();
    int status = 0;
    ErrorCode code = ErrorCode::InvalidArgument;
    std::exception_ptr error;
    std::string message, chosen;
    std::vector<char> state;
    Manifest m;
    if (rt.is_root()) {
      std::vector<std::string> skipped;
      for (const std::string& path : candidates) {
        try {
          state = read_checked(path, m);
          status = 1;
          chosen = path;
          break;
        } catch (const Error& e) {
          const bool damaged = e.code() == ErrorCode::Corrupt || e.code() == ErrorCode::Io;
          if (!fall_back || !damaged) {
            status = 2;
            code = e.code();
            message = e.what();
            error = std::current_exception();
            break;
          }
          detail::log_warning(std::string("skipping damaged checkpoint: ") + e.what());
          skipped.push_back(e.what());
        }
      }
      if (status == 0 && !skipped.empty()) {
        status = 2;
        code = ErrorCode::Corrupt;
        std::string text = "no valid checkpoint in " + options.dir + ":";
        for (const auto& s : skipped) text += "\n  " + s;
        error = std::make_exception_ptr(Error(code, text, __FILE__, __LINE__));
        message = text;
      }
      if (status == 1 && chosen != candidates.front())
        detail::log_warning("resuming from the previous valid checkpoint " + chosen);
    }
    TrainProgress p = distribute_and_apply(status, code, error, message, state, m, chosen);
    if (p.step < 0) return std::nullopt;
    return p;
  }
};

Checkpointer::Checkpointer(Runtime& runtime, CheckpointOptions options, std::string model_description)
    : impl_(std::make_unique<Impl>(runtime, std::move(options), std::move(model_description))) {
  DSTRAIN_CHECK(!impl_->options.dir.empty(), "Checkpointer needs a folder");
  DSTRAIN_CHECK(impl_->options.keep >= 1, "keep must be at least 1");
  DSTRAIN_CHECK(impl_->options.every_steps >= 0 && impl_->options.every_minutes >= 0,
                "checkpoint intervals must not be negative");
}

Checkpointer::~Checkpointer() = default;

void Checkpointer::add_replicated(const std::string& name, Tensor& t) {
  impl_->check_name(name);
  impl_->entries.push_back({name, &t, false, OnWorldSizeChange::Refuse});
}

void Checkpointer::add_per_rank(const std::string& name, Tensor& t, OnWorldSizeChange policy) {
  impl_->check_name(name);
  impl_->entries.push_back({name, &t, true, policy});
}

void Checkpointer::add_model(nn::Layer& model) {
  const auto params = model.parameters();
  for (std::size_t i = 0; i < params.size(); ++i)
    add_replicated("param." + std::to_string(i) + " " + params[i]->name, params[i]->value);
  const auto buffers = model.buffers();
  for (std::size_t i = 0; i < buffers.size(); ++i)
    add_per_rank("buffer." + std::to_string(i), *buffers[i], OnWorldSizeChange::TakeRankZero);
}

void Checkpointer::add_optimizer(optim::SGD& optimizer) {
  auto& m = optimizer.momentum_buffers();
  for (std::size_t i = 0; i < m.size(); ++i)
    if (m[i].defined()) add_replicated("sgd.momentum." + std::to_string(i), m[i]);
}

void Checkpointer::add_blob(const std::string& name, std::function<std::vector<char>()> save,
                            std::function<void(const std::vector<char>&)> load) {
  impl_->check_name(name);
  DSTRAIN_CHECK(save && load, "blob '" + name + "' needs save and load functions");
  impl_->blobs.push_back({name, std::move(save), std::move(load)});
}

void Checkpointer::set_metadata(std::map<std::string, std::string> metadata) { impl_->metadata = std::move(metadata); }

bool Checkpointer::due(std::int64_t step) {
  const CheckpointOptions& o = impl_->options;
  if (o.every_steps > 0 && step > 0 && step % o.every_steps == 0) return true;
  if (o.every_minutes <= 0) return false;
  Runtime& rt = impl_->rt;
  const double minutes = ms_since(impl_->last_save) / 60000.0;
  if (rt.world_size() == 1) return minutes >= o.every_minutes;
  // Rank 0's clock decides, so that every rank saves at the same step.
  Tensor flag = Tensor::zeros({1}, DType::I32, Device::cpu());
  flag.data_as<std::int32_t>()[0] = rt.is_root() && minutes >= o.every_minutes ? 1 : 0;
  rt.host_comm().broadcast(flag, 0, rt.context());
  return flag.data_as<std::int32_t>()[0] != 0;
}

void Checkpointer::save(const TrainProgress& progress) { impl_->save(progress); }

void Checkpointer::wait() {
  impl_->join_writer();
  if (impl_->writer_error) {
    auto e = impl_->writer_error;
    impl_->writer_error = nullptr;
    std::rethrow_exception(e);
  }
}

std::optional<TrainProgress> Checkpointer::restore_latest() {
  return impl_->restore_from(impl_->rt.is_root() ? impl_->list() : std::vector<std::string>{}, true);
}

TrainProgress Checkpointer::restore(const std::string& checkpoint_path) {
  auto p = impl_->restore_from({checkpoint_path}, false);
  if (!p) DSTRAIN_THROW(ErrorCode::Io, "no checkpoint at " + checkpoint_path);
  return *p;
}

std::vector<std::string> Checkpointer::list() const { return impl_->list(); }
const SaveStats& Checkpointer::last_save_stats() const { return impl_->stats; }
const std::string& Checkpointer::dir() const { return impl_->options.dir; }

}  // namespace dstrain
