#include "dstrain/models.h"

namespace dstrain::models {

std::unique_ptr<nn::Sequential> small_cnn(Device device, int classes, int in_channels, amp::Policy policy) {
  auto net = std::make_unique<nn::Sequential>();
  const int widths[6] = {32, 32, 64, 64, 128, 128};
  int in = in_channels;
  for (int i = 0; i < 6; ++i) {
    net->emplace<nn::ConvBnRelu>(device, in, widths[i], /*kernel=*/3, /*stride=*/1, /*padding=*/1, policy);
    if (i == 1 || i == 3) net->emplace<nn::MaxPool2x2>();
    in = widths[i];
  }
  net->emplace<nn::GlobalAvgPool>();
  net->emplace<nn::Linear>(device, in, classes, /*bias=*/true, policy);
  return net;
}

}  // namespace dstrain::models
