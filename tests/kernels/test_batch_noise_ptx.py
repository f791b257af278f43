"""The Philox normal draw compiled for a GPU (sm_90 offline, tests/helpers.offline_ptx) takes the hardware's cos /
sin approximations, not libdevice's exact ones: no local-memory large-argument reduction, and at most half the
instructions of the exact form (measured 526 vs 1239 per thread of 8 elements). Its accuracy is a GPU test
(tests/gpu/test_gpu_fast_path.py: within 1e-5 of the exact transform)."""
from __future__ import annotations

from tests.helpers import offline_ptx, ptx_instructions

SIGNATURE = {"out_ptr": "*fp32", "seed_ptr": "*i64", "step_ptr": "*i64", "mean_ptr": "*fp32", "std_ptr": "*fp32",
             "seed_lo": "i32", "seed_hi": "i32", "step_lo": "i32", "mean_value": "fp32", "std_value": "fp32",
             "numel": "i32", "low": "fp32", "high": "fp32", "below_one": "fp32", "KIND": "constexpr",
             "SEED_IN_MEMORY": "constexpr", "STEP_IN_MEMORY": "constexpr", "MEAN_IN_MEMORY": "constexpr",
             "STD_IN_MEMORY": "constexpr", "APPROX_MATH": "constexpr", "BLOCK": "constexpr"}


def _draw(approx: bool, launch_specialised: bool = False):
    constexprs = {"KIND": 0, "SEED_IN_MEMORY": False, "STEP_IN_MEMORY": True, "MEAN_IN_MEMORY": True,
                  "STD_IN_MEMORY": True, "APPROX_MATH": approx, "BLOCK": 1024}
    divisible = ("out_ptr", "seed_ptr", "step_ptr", "mean_ptr", "std_ptr", "numel") if launch_specialised else ()
    return ptx_instructions(offline_ptx("unlearn_fast.kernels.batch_noise", "_philox_batch_noise_forward_kernel",
                                        SIGNATURE, constexprs, divisible_by_16=divisible, num_warps=4,
                                        enable_fp_fusion=False))


def test_gpu_draw_uses_the_hardware_cos_and_sin():
    approx, exact = _draw(True), _draw(False)
    for name, body in (("approx", approx), ("exact", exact)):
        print(name, len(body), "instructions")
    assert sum("sin.approx" in i for i in approx) >= 4 and sum("cos.approx" in i for i in approx) >= 4
    assert not any(".local" in i for i in approx) and any(".local" in i for i in exact)
    assert 2 * len(approx) <= len(exact)


def test_gpu_draw_as_launched_stores_whole_groups_without_shared_memory():
    """As a real launch compiles it (aligned tensors, a numel that is a multiple of 16): each thread stores its
    groups' four values with 16-byte stores where the draw made them (tl.interleave's reshape needs no trip through
    shared memory), in under 0.4 of the exact form's PTX instructions (measured 435 vs 1152 per thread of 8
    elements: about 54 per element, near the ~40 per element at which the H100's issue rate meets 3 TB/s of fp32
    stores)."""
    approx, exact = _draw(True, True), _draw(False, True)
    print("approx", len(approx), "exact", len(exact), "instructions")
    assert not any(".shared" in i or "bar.sync" in i for i in approx)
    stores = [i for i in approx if "st.global" in i]
    assert stores and all("st.global.v4.b32" in i for i in stores)
    assert len(approx) <= 0.4 * len(exact)


def _moments(even: bool):
    signature = {"x_ptr": "*fp32", "partial_ptr": "*fp32", "numel": "i32", "n_blocks": "i32", "BLOCK": "constexpr",
                 "EVEN": "constexpr"}
    ptx = offline_ptx("unlearn_fast.kernels.batch_noise", "_batch_moments_forward_kernel", signature,
                      {"BLOCK": 4096, "EVEN": even}, divisible_by_16=("x_ptr", "partial_ptr", "numel"), num_warps=8)
    return ptx_instructions(ptx)


def test_moments_of_whole_blocks_load_unmasked_and_reduce_twice():
    """A batch of whole 4096-element blocks (3·224²·N, 3·256²·N): 16-byte loads without predicates and two block
    reductions (the mean, then the squared deviations), not three: the count is the block size (measured 141 vs 179
    PTX instructions a program; the kernel with a counted mask was 291)."""
    even, masked = _moments(True), _moments(False)
    print("even", len(even), "masked", len(masked), "instructions")
    loads = [i for i in even if "ld.global" in i]
    assert loads and all(i.startswith("ld.global.v4") for i in loads)  # no "@%p" predicate
    # two reductions in each (a counted mask was a third)
    assert sum("shfl.sync" in i for i in even) == sum("shfl.sync" in i for i in masked)
    assert len(even) < 0.85 * len(masked)
