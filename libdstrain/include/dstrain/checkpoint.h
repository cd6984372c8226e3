// Checkpointer: saves what a resumed run needs and restores it, bit for bit.
//
// A checkpoint is a folder <dir>/step-<12 digits>/ holding state.bin (every tensor and blob) and
// MANIFEST (format version, step, epoch, world size, model description, user metadata, and the
// size and CRC-32C of state.bin, then a CRC-32C of the manifest itself). It is written into
// <dir>/.tmp-step-.../, fsync'd, then renamed into place, so a crash or kill -9 at any moment
// leaves the previous checkpoint loadable. The newest `keep` are kept.
//
// Saving is asynchronous: save() copies the state into one pinned host image (the caller waits
// only for that copy) and a background thread checksums and writes it; a save that finds the
// previous one still writing waits for it first. Replicated state (parameters, optimizer state)
// is written once, by rank 0; per-rank state (BatchNorm running statistics, per-rank
// accumulators) is gathered to rank 0 at save time. On restore, rank 0 reads and checks the file
// and broadcasts it; every rank takes its own part.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dstrain/nn.h"
#include "dstrain/optim.h"
#include "dstrain/runtime.h"

namespace dstrain {

constexpr std::uint32_t kCheckpointFormatVersion = 1;

struct CheckpointOptions {
  std::string dir;
  int keep = 3;                  // newest checkpoints kept (>= 1)
  std::int64_t every_steps = 0;  // due() every N steps; 0: not by steps
  double every_minutes = 10.0;   // due() when this long has passed since the last save; 0: not by time
};

// Where a run stands. Saved with the state and handed back by restore.
struct TrainProgress {
  std::int64_t step = 0;           // optimizer steps completed
  std::int64_t epoch = 0;          // epoch the next step belongs to
  std::int64_t step_in_epoch = 0;  // data-loader position: batches of `epoch` already consumed
};

// What a rank does with per-rank state when the checkpoint was written by another world size.
enum class OnWorldSizeChange {
  Refuse,       // the restore fails with a message naming the entry
  TakeRankZero, // every rank takes saved rank 0's copy (BatchNorm running statistics)
  SumToRankZero // rank 0 takes the element-wise sum over saved ranks, others zero (fp32 accumulators)
};

struct SaveStats {
  double blocked_ms = 0;      // time save() kept the caller (gather + copy to pinned memory)
  double wait_previous_ms = 0;  // part of blocked_ms spent waiting for the previous write
  double write_s = 0;         // background: checksum, write, fsync, rename
  std::uint64_t bytes = 0;    // size of state.bin
};

class Checkpointer {
 public:
  // model_description names the architecture (compared on restore, with every entry's shape).
  Checkpointer(Runtime& runtime, CheckpointOptions options, std::string model_description);
  ~Checkpointer();  // waits for a write in flight (logging, not throwing, its error)
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Registration: the tensors must outlive the Checkpointer; names are unique.
  void add_replicated(const std::string& name, Tensor& t);
  void add_per_rank(const std::string& name, Tensor& t, OnWorldSizeChange policy);
  // Parameters replicated; buffers (BatchNorm running statistics) per rank, TakeRankZero.
  void add_model(nn::Layer& model);
  void add_optimizer(optim::SGD& optimizer);  // momentum buffers, replicated
  // Replicated state that is not a tensor (loss-scaler state, RNG state): serialised by `save`,
  // handed to `load` on restore.
  void add_blob(const std::string& name, std::function<std::vector<char>()> save,
                std::function<void(const std::vector<char>&)> load);

  // Settings that must match on resume (global batch, seed, schedule length, ...): written with
  // every checkpoint and compared key by key on restore; a difference raises InvalidArgument.
  void set_metadata(std::map<std::string, std::string> metadata);

  // True on every rank at the same calls: when `step` is a multiple of every_steps, or when
  // every_minutes have passed on rank 0's clock since the last save (one small broadcast then).
  bool due(std::int64_t step);
  // Starts a checkpoint of the current state (collective: every rank calls it).
  void save(const TrainProgress& progress);
  // Waits for the write in flight; rethrows its error (rank 0).
  void wait();

  // Restores the newest valid checkpoint of dir (collective). None: nullopt. When the newest is
  // damaged (truncated, a flipped byte, an unreadable manifest), the previous valid one is used
  // with a warning. A wrong format version or another model's checkpoint is refused with Error.
  std::optional<TrainProgress> restore_latest();
  // Restores this checkpoint folder (collective); any defect raises Error naming the file.
  TrainProgress restore(const std::string& checkpoint_path);

  // Checkpoint folders of dir, newest first (complete ones only: step-*, not .tmp-*).
  std::vector<std::string> list() const;
  const SaveStats& last_save_stats() const;
  const std::string& dir() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Exposed for tests and tools: CRC-32C (Castagnoli) of a buffer, continuing from `crc`.
std::uint32_t crc32c(const void* data, std::size_t bytes, std::uint32_t crc = 0);

// Test hook: when the environment variable DSTRAIN_CHECKPOINT_FAULT names a point of the write
// ("data", "manifest", "rename"), the writing process kills itself with SIGKILL there.

}  // namespace dstrain
