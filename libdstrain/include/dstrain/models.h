// Ready-made networks.
#pragma once
#include <memory>

#include "dstrain/nn.h"

namespace dstrain::models {

// The Fashion-MNIST network of the reference script: six 3x3 Conv(no bias)+BatchNorm+ReLU
// layers (each one fused nn::ConvBnRelu) with channels in->32->32 | maxpool 2 | 32->64->64 |
// maxpool 2 | 64->128->128, global average pool, Linear 128->classes. Input [N,H,W,in_channels]
// (any of fp32/fp16/bf16), logits fp32. `policy` sets the precision of the convolutions,
// activations and the linear layer (fp8_hybrid(): bf16 activations and convolution backward,
// FP8 convolution forwards where cuDNN offers them, FP8 linear layer). With `chain`, the two
// convolutions before each pooling are chained (nn::ConvBnRelu::chain; not under FP8): the second
// applies the first's BatchNorm and ReLU in its own prologue.
std::unique_ptr<nn::Sequential> small_cnn(Device device, int classes = 10, int in_channels = 1,
                                          amp::Policy policy = {}, bool chain = true);

}  // namespace dstrain::models
