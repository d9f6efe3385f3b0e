// The setmaxnreg budgets of a warp-specialized sm90 kernel (one producer warpgroup, the rest
// consumers, one block per SM). setmaxnreg only moves registers between the warpgroups of a
// block: the block keeps what the launch gave it, registers_at_launch per thread. A split that
// asks for more makes the consumers' setmaxnreg.inc wait forever for registers nobody frees: the
// kernel hangs, with no error (branch sm90-bwd-persistent gave its producer 32 instead of 24
// beside two consumer warpgroups of 240, which the old check, against the whole register file,
// let through: on an H100 one backward of a single 1000-token sequence never returned, and with
// 40 / 232 the branch passed its backward tests). So the traits check their split here at compile
// time.
#pragma once

namespace flash_varlen {
namespace sm90 {

constexpr int kRegistersPerSm = 64 * 1024;  // 32-bit registers per SM (Hopper)
// Registers are allocated per warp in units of 256, so per thread in multiples of 8; setmaxnreg
// takes counts in [24, 256] in the same multiples.
constexpr int kRegisterGranule = 8;
constexpr int kMinSetmaxnreg = 24;
constexpr int kMaxSetmaxnreg = 256;

// The most registers per thread a kernel of `threads` threads per block (one block per SM) can
// be given at launch: 168 for 384 threads, 128 for 512. The check assumes ptxas gives the kernel
// that many, as its report says for every sm90 kernel so far ("Used 168 registers" at 384
// threads; scripts/compile_kernel.py prints it).
constexpr int registers_at_launch(int threads) {
    return kRegistersPerSm / threads / kRegisterGranule * kRegisterGranule;
}

constexpr bool is_setmaxnreg_count(int registers) {
    return registers % kRegisterGranule == 0 && registers >= kMinSetmaxnreg &&
           registers <= kMaxSetmaxnreg;
}

// Whether the producer warpgroup's and each of `consumer_warpgroups` consumer warpgroups'
// register counts are valid setmaxnreg counts whose sum fits what the block holds.
constexpr bool register_split_fits(int threads_per_warpgroup, int producer, int consumer,
                                   int consumer_warpgroups) {
    const int threads = threads_per_warpgroup * (1 + consumer_warpgroups);
    return is_setmaxnreg_count(producer) && is_setmaxnreg_count(consumer) &&
           threads_per_warpgroup * (producer + consumer_warpgroups * consumer) <=
               threads * registers_at_launch(threads);
}

static_assert(registers_at_launch(384) == 168 && registers_at_launch(512) == 128);
static_assert(register_split_fits(128, 24, 240, 2) && register_split_fits(128, 40, 232, 2));
static_assert(!register_split_fits(128, 32, 240, 2), "the split that hung");
static_assert(register_split_fits(128, 32, 160, 3));

}  // namespace sm90
}  // namespace flash_varlen
