// Host harness for CI (no GPU): runs the kernel's per-thread work for every thread index on the CPU, so the
// arithmetic and the indexing are checked against the numpy reference. Built as a shared library, used via ctypes.
#include "preprocess.cuh"

extern "C" {

int bhx_sizeof_fieldjob() { return (int)sizeof(bhx::FieldJob); }
int bhx_sizeof_params() { return (int)sizeof(bhx::Params); }

long long bhx_thread_count(const bhx::Params* p) { return (long long)bhx::thread_count(*p); }

void bhx_host_preprocess(const uint8_t* src, const bhx::FieldJob* jobs, const bhx::Params* p, void* dst) {
    const int64_t n = bhx::thread_count(*p);
    for (int64_t tid = 0; tid < n; ++tid) bhx::thread_work(tid, src, jobs, *p, dst);
}

}
