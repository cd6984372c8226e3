// Builds against the installed public headers and runs one CPU op through the library.
#include <dstrain/dstrain.h>

#include <cstdio>

int main() {
  dstrain::Context ctx = dstrain::Context::cpu();
  auto x = dstrain::Tensor::from_vector({1, 2, 2, 1}, {-1.0f, 2.0f, -3.0f, 4.0f});
  auto y = dstrain::Tensor::empty({1, 2, 2, 1}, dstrain::DType::F32, dstrain::Device::cpu());
  dstrain::ops::relu_forward(ctx, x, y);
  const auto v = y.to_host_floats();
  const bool ok = v[0] == 0.0f && v[1] == 2.0f && v[2] == 0.0f && v[3] == 4.0f;
  std::printf("dstrain %s consumer: relu %s\n", DSTRAIN_VERSION_STRING, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
