// FKD_HD marks the functions shared by the CPU and CUDA kernels (kd_loss_math.h, clip.h): host and
// device functions under nvcc, plain inline functions in the C++ files.
#pragma once

#if defined(__CUDACC__)
#define FKD_HD __host__ __device__ __forceinline__
#else
#define FKD_HD inline
#endif
