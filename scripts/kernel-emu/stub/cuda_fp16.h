// Host stand-in for <cuda_fp16.h>, for the kernel emulator only: __half
// as _Float16, converted with round-to-nearest-even like the device.
#pragma once
typedef _Float16 __half;
inline float __half2float(__half v) { return (float)v; }
inline __half __float2half_rn(float v) { return (_Float16)v; }
