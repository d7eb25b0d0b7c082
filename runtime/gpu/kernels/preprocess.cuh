// Fused tiling + normalisation: uint8 HWC images -> the contract's patches of every field -> NCHW FP32/FP16.
//
// All arithmetic and indexing lives in __host__ __device__ functions so that the host harness (harness.cu, built
// with nvcc and run on the CPU in CI) executes exactly the code the GPU kernel runs, thread by thread.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace bhx {

// One field to cut: where its image lies in the packed source buffer and how to read it. 32 bytes.
struct FieldJob {
    int64_t src_offset;  // byte offset of the image's first pixel in the source buffer
    int32_t pitch;       // bytes per image row (>= width * channels; any value)
    int32_t channels;    // 3 or 4 (the 4th channel is ignored)
    int32_t origin_y;    // field top-left pixel in the image
    int32_t origin_x;
    int32_t src_bgr;     // 1 if the image's first three channels are B, G, R; 0 if R, G, B
    int32_t pad_;
};

// Per-launch constants (the preprocessing contract plus the destination layout).
struct Params {
    int32_t patch;      // P: patch side
    int32_t stride;     // distance between patch origins
    int32_t rows;       // patches per field, vertically
    int32_t cols;       // patches per field, horizontally
    int32_t dst_bgr;    // 1 if the model wants B, G, R planes; 0 for R, G, B
    int32_t fp16;       // 1: write __half, 0: write float
    int32_t n_fields;   // fields in this launch
    int32_t dst_field0; // batch index of the first field in the destination tensor
    float mean[3];      // subtracted per destination channel
    float scale[3];     // multiplied after the subtraction
};

constexpr int kVec = 8;  // outputs per channel per thread: 8 halves = 16 bytes, 8 floats = 2 x 16 bytes

// The per-element arithmetic: float(v) - mean, then * scale, each rounded once in FP32, as numpy does it.
__host__ __device__ inline float normalise(uint8_t v, const Params& p, int c) {
    const float d = (float)v - p.mean[c];
    return p.scale[c] == 1.0f ? d : d * p.scale[c];
}

// Copy n (<= 32) contiguous bytes using the widest loads the address allows (16, 8 or 4 bytes, then single
// bytes): a warp's threads read adjacent runs, so the warp's loads are coalesced as well as wide.
__host__ __device__ inline void load_run(const uint8_t* src, int n, uint8_t* out) {
    const uintptr_t a = (uintptr_t)src;
    int i = 0;
    if ((a & 15) == 0) {
        for (; i + 16 <= n; i += 16) *reinterpret_cast<uint4*>(out + i) = *reinterpret_cast<const uint4*>(src + i);
    } else if ((a & 7) == 0) {
        for (; i + 8 <= n; i += 8) *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<const uint2*>(src + i);
    } else if ((a & 3) == 0) {
        for (; i + 4 <= n; i += 4) *reinterpret_cast<uint32_t*>(out + i) = *reinterpret_cast<const uint32_t*>(src + i);
    }
    for (; i < n; ++i) out[i] = src[i];
}

// Threads needed for a launch: one per (field, patch, row, group of kVec columns).
__host__ __device__ inline int64_t thread_count(const Params& p) {
    const int groups = (p.patch + kVec - 1) / kVec;
    return (int64_t)p.n_fields * p.rows * p.cols * p.patch * groups;
}

// Everything thread `tid` does: read kVec pixels of one patch row (all channels: one run of adjacent bytes, wide
// loads where aligned) and write kVec outputs to each of the 3 channel planes, 16-byte stores when aligned.
__host__ __device__ inline void thread_work(int64_t tid, const uint8_t* src, const FieldJob* jobs, const Params& p,
                                            void* dst) {
    const int groups = (p.patch + kVec - 1) / kVec;
    const int T = p.rows * p.cols;
    int64_t r = tid;
    const int g = (int)(r % groups); r /= groups;
    const int y = (int)(r % p.patch); r /= p.patch;
    const int t = (int)(r % T); r /= T;
    const int f = (int)r;
    if (f >= p.n_fields) return;
    const FieldJob job = jobs[f];
    const int x0 = g * kVec;
    const int n = (p.patch - x0) < kVec ? (p.patch - x0) : kVec;
    const int64_t plane = (int64_t)p.patch * p.patch;
    const int64_t base = ((int64_t)(p.dst_field0 + f) * T + t) * 3 * plane + (int64_t)y * p.patch + x0;
    const int sy = job.origin_y + (t / p.cols) * p.stride + y;
    const int sx = job.origin_x + (t % p.cols) * p.stride + x0;
    alignas(16) uint8_t px[kVec * 4];  // n pixels x (3 or 4) channels, as stored
    load_run(src + job.src_offset + (int64_t)sy * job.pitch + (int64_t)sx * job.channels, n * job.channels, px);
    for (int c = 0; c < 3; ++c) {
        const int sc = (job.src_bgr == p.dst_bgr) ? c : 2 - c;
        float v[kVec];
        for (int i = 0; i < n; ++i) v[i] = normalise(px[i * job.channels + sc], p, c);
        const int64_t o = base + c * plane;
        if (p.fp16) {
            __half* out = static_cast<__half*>(dst) + o;
            if (n == kVec && ((uintptr_t)out & 15) == 0) {
                alignas(16) __half h[kVec];
                for (int i = 0; i < kVec; ++i) h[i] = __float2half_rn(v[i]);
                *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(h);
            } else {
                for (int i = 0; i < n; ++i) out[i] = __float2half_rn(v[i]);
            }
        } else {
            float* out = static_cast<float*>(dst) + o;
            if (n == kVec && ((uintptr_t)out & 15) == 0) {
                reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
                reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                for (int i = 0; i < n; ++i) out[i] = v[i];
            }
        }
    }
}

}  // namespace bhx
