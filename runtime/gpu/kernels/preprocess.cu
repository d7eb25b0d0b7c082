// The GPU kernel: one launch cuts and normalises every field of a batch (fields of several images, each with its
// own size, pitch, channel count and order, listed in `jobs`) straight into the engine's input tensor.
#include "preprocess.cuh"

extern "C" __global__ void bhx_preprocess(const uint8_t* __restrict__ src, const bhx::FieldJob* __restrict__ jobs,
                                          const bhx::Params* __restrict__ params, void* __restrict__ dst) {
    const bhx::Params p = *params;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid < bhx::thread_count(p)) bhx::thread_work(tid, src, jobs, p, dst);
}
