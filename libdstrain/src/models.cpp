#include "dstrain/models.h"

namespace dstrain::models {

std::unique_ptr<nn::Sequential> small_cnn(Device device, int classes, int in_channels, amp::Policy policy,
                                          bool chain) {
  auto net = std::make_unique<nn::Sequential>();
  const int widths[6] = {32, 32, 64, 64, 128, 128};
  int in = in_channels;
  nn::ConvBnRelu* previous = nullptr;
  for (int i = 0; i < 6; ++i) {
    auto& layer = net->emplace<nn::ConvBnRelu>(device, in, widths[i], /*kernel=*/3, /*stride=*/1, /*padding=*/1,
                                               policy);
    // Each pair of convolutions before a pooling is chained (the second applies the first's BN +
    // ReLU in its prologue); under FP8 the chain is refused and both layers run on their own.
    if (chain && i % 2 == 1) nn::ConvBnRelu::chain(*previous, layer);
    previous = &layer;
    if (i == 1 || i == 3) net->emplace<nn::MaxPool2x2>();
    in = widths[i];
  }
  net->emplace<nn::GlobalAvgPool>();
  net->emplace<nn::Linear>(device, in, classes, /*bias=*/true, policy);
  return net;
}

}  // namespace dstrain::models
