// The ErrorCode of the dstrain::Error a call raises; the test fails when it raises none.
#pragma once
#include <catch2/catch.hpp>

#include <functional>

#include "dstrain/error.h"

namespace dstrain_test {

inline dstrain::ErrorCode error_code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const dstrain::Error& e) {
    return e.code();
  }
  FAIL("expected a dstrain::Error");
  return dstrain::ErrorCode::Internal;
}

}  // namespace dstrain_test
