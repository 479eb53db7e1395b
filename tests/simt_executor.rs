//! Tests of the SIMT executor itself (kernels/simt/), through its self-test kernels
//! (kernels/simt/tests/*.cu), in both lane orders.
//!
//! Every expected value is computed here from the rule it tests (the CUDA Programming Guide, or the PTX
//! ISA definition of shfl.sync / vote.sync), written in a comment above the check; none is taken from
//! the executor's own output.
#![allow(clippy::needless_range_loop)]

mod common;

use std::ptr;

use vppo::simt::selftest::{self as st, SelftestParams};
use vppo::simt::{launch, SimtEntry};
use vppo::{LaneOrder, VppoError};

const ORDERS: [LaneOrder; 2] = [LaneOrder::Forward, LaneOrder::Reverse];
const FULL: u32 = 0xffff_ffff;

/// Host buffers behind one `SelftestParams`.
#[derive(Default, Clone)]
struct Bufs {
    in_a: Vec<i32>,
    in_b: Vec<i32>,
    in_mask: Vec<u32>,
    in_f: Vec<f32>,
    in_u64: Vec<u64>,
    out_a: Vec<i32>,
    out_b: Vec<i32>,
    out_u: Vec<u32>,
    out_f: Vec<f32>,
    out_u64: Vec<u64>,
}

fn ptr_or_null<T>(v: &[T]) -> *const T {
    if v.is_empty() {
        ptr::null()
    } else {
        v.as_ptr()
    }
}

fn mut_or_null<T>(v: &mut [T]) -> *mut T {
    if v.is_empty() {
        ptr::null_mut()
    } else {
        v.as_mut_ptr()
    }
}

/// Runs a self-test kernel over `bufs`. Each test sizes the buffers for what its kernel touches (the
/// kernel's comment in kernels/simt/tests/ says which).
#[allow(clippy::too_many_arguments)]
fn run(
    entry: SimtEntry,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    order: LaneOrder,
    b: &mut Bufs,
    mode: i32,
    width: i32,
    n: i32,
) -> Result<(), VppoError> {
    let p = SelftestParams {
        in_a: ptr_or_null(&b.in_a),
        in_b: ptr_or_null(&b.in_b),
        in_mask: ptr_or_null(&b.in_mask),
        in_f: ptr_or_null(&b.in_f),
        in_u64: ptr_or_null(&b.in_u64),
        out_a: mut_or_null(&mut b.out_a),
        out_b: mut_or_null(&mut b.out_b),
        out_u: mut_or_null(&mut b.out_u),
        out_f: mut_or_null(&mut b.out_f),
        out_u64: mut_or_null(&mut b.out_u64),
        mode,
        width,
        n,
        pad0: 0,
    };
    // SAFETY: every buffer is sized for the accesses the kernel makes for this grid (see each test), and
    // no Rust reference to them is used while the launch runs.
    unsafe { launch(entry, grid, block, shared, order, &p) }
}

/// [`run`] in one block of `threads` threads, with no dynamic shared memory and n = 0.
fn run_block(
    entry: SimtEntry,
    threads: u32,
    order: LaneOrder,
    b: &mut Bufs,
    mode: i32,
    width: i32,
) -> Result<(), VppoError> {
    run(
        entry,
        [1, 1, 1],
        [threads, 1, 1],
        0,
        order,
        b,
        mode,
        width,
        0,
    )
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn kernel_err(r: Result<(), VppoError>) -> String {
    match r {
        Err(VppoError::Kernel(m)) => m,
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

/// Runs the error self-test `entry` in one block of `threads` threads (out_a sized for them, width
/// 32, n 0) and returns the kernel error it must report, with the buffers it left.
fn one_block_error(entry: SimtEntry, threads: u32, order: LaneOrder, mode: i32) -> (String, Bufs) {
    let mut b = Bufs {
        out_a: vec![0; threads as usize],
        ..Default::default()
    };
    let msg = kernel_err(run_block(entry, threads, order, &mut b, mode, 32));
    (msg, b)
}

/// The line of kernels/simt/tests/<file> that carries `// MARK:<name>`.
fn mark_line(file: &str, name: &str) -> usize {
    let path = format!("{}/kernels/simt/tests/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let tag = format!("MARK:{name}");
    text.lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("{tag} not in {path}"))
        + 1
}

// ------------------------------------------------------------------------------------------------
// Shuffles
// ------------------------------------------------------------------------------------------------

/// The source lane of shfl.sync, per the PTX ISA: c = ((32 - width) << 8) | clamp with clamp 0 for
/// .up and 31 otherwise, so segmask = 32 - width; bval = b[4:0]; minLane = lane & segmask;
/// maxLane = minLane | (clamp & ~segmask);
///   up:   j = lane - bval, valid when j >= maxLane
///   down: j = lane + bval, valid when j <= maxLane
///   bfly: j = lane ^ bval, valid when j <= maxLane (so earlier subsections may be read)
///   idx:  j = minLane | (bval & ~segmask), valid when j <= maxLane
/// and a lane whose j is not valid gets its own value.
fn ptx_source(mode: i32, lane: i32, b: i32, width: i32) -> i32 {
    let segmask = 32 - width;
    let bval = b & 31;
    let min_lane = lane & segmask;
    let clamp = if mode == 1 { 0 } else { 31 };
    let max_lane = min_lane | (clamp & !segmask);
    let (j, valid) = match mode {
        0 => {
            let j = min_lane | (bval & !segmask);
            (j, j <= max_lane)
        }
        1 => (lane - bval, lane - bval >= max_lane),
        2 => (lane + bval, lane + bval <= max_lane),
        _ => (lane ^ bval, (lane ^ bval) <= max_lane),
    };
    if valid {
        j
    } else {
        lane
    }
}

/// Runs selftest_shfl with values 1000 + t and per-thread b, and checks each active thread against
/// ptx_source.
fn check_shfl(threads: u32, mode: i32, width: i32, masks: &[u32], bs: &[i32]) {
    for order in ORDERS {
        let mut b = Bufs {
            in_a: (0..threads as i32).map(|t| 1000 + t).collect(),
            in_b: bs.to_vec(),
            in_mask: masks.to_vec(),
            out_a: vec![-7; threads as usize],
            ..Default::default()
        };
        run_block(
            st::vppo_simt_selftest_shfl,
            threads,
            order,
            &mut b,
            mode,
            width,
        )
        .unwrap();
        for t in 0..threads as i32 {
            if masks[t as usize] == 0 {
                continue; // exited at once
            }
            let lane = t % 32;
            let j = ptx_source(mode, lane, bs[t as usize], width);
            let expected = 1000 + (t - lane) + j;
            assert_eq!(
                b.out_a[t as usize], expected,
                "mode {mode} width {width} thread {t} b {} order {order:?}",
                bs[t as usize]
            );
        }
    }
}

#[test]
fn shuffles_follow_ptx_for_every_mode_width_and_offset() {
    let mut rng = Rng(0x1234_5678_9abc_def0);
    for mode in 0..4 {
        for width in [1, 2, 4, 8, 16, 32] {
            for _ in 0..3 {
                // Two full warps, offsets anywhere in [-40, 40] (out of range on purpose: bval = b & 31).
                let bs: Vec<i32> = (0..64).map(|_| rng.below(81) as i32 - 40).collect();
                let bs: Vec<i32> = if mode == 1 || mode == 2 {
                    bs.iter().map(|b| b.abs()).collect()
                } else {
                    bs
                };
                check_shfl(64, mode, width, &vec![FULL; 64], &bs);
            }
        }
    }
}

#[test]
fn shuffle_examples_from_the_programming_guide() {
    // __shfl_sync(full, v, 0): every lane gets lane 0's value (the broadcast example).
    let mut b = Bufs {
        in_a: (0..32).map(|t| 1000 + t).collect(),
        in_b: vec![0; 32],
        in_mask: vec![FULL; 32],
        out_a: vec![0; 32],
        ..Default::default()
    };
    run_block(
        st::vppo_simt_selftest_shfl,
        32,
        LaneOrder::Forward,
        &mut b,
        0,
        32,
    )
    .unwrap();
    assert!(b.out_a.iter().all(|&v| v == 1000));
    // __shfl_up_sync(full, v, 1): lane 0 keeps its own value, lane l gets lane l-1's (a scan step).
    b.in_b = vec![1; 32];
    run_block(
        st::vppo_simt_selftest_shfl,
        32,
        LaneOrder::Reverse,
        &mut b,
        1,
        32,
    )
    .unwrap();
    assert_eq!(b.out_a[0], 1000);
    assert!((1..32).all(|l| b.out_a[l] == 1000 + l as i32 - 1));
    // __shfl_down_sync(full, v, 4, 8): within each 8-lane subsection, lanes 4..7 keep their own value.
    b.in_b = vec![4; 32];
    run_block(
        st::vppo_simt_selftest_shfl,
        32,
        LaneOrder::Forward,
        &mut b,
        2,
        8,
    )
    .unwrap();
    for l in 0..32 {
        let expected = if l % 8 < 4 { l + 4 } else { l };
        assert_eq!(b.out_a[l as usize], 1000 + expected);
    }
    // __shfl_xor_sync(full, v, 16, 16): lane 0's partner 16 lies past its subsection's end (15), so lane 0
    // keeps its own value; lane 16's partner 0 is below its end (31), so it reads lane 0.
    b.in_b = vec![16; 32];
    run_block(
        st::vppo_simt_selftest_shfl,
        32,
        LaneOrder::Reverse,
        &mut b,
        3,
        16,
    )
    .unwrap();
    assert_eq!(b.out_a[0], 1000);
    assert_eq!(b.out_a[16], 1000);
    assert_eq!(b.out_a[17], 1001);
    // __shfl_sync(full, v, 35, 8): srcLane is taken modulo width: lane 9 reads lane 8 + 3 = 11.
    b.in_b = vec![35; 32];
    run_block(
        st::vppo_simt_selftest_shfl,
        32,
        LaneOrder::Forward,
        &mut b,
        0,
        8,
    )
    .unwrap();
    assert_eq!(b.out_a[9], 1011);
    assert_eq!(b.out_a[30], 1027);
}

#[test]
fn shuffles_with_partial_masks_and_a_partial_warp() {
    // 40 threads: warp 1 has 8 lanes. Warp 0 uses the lower 16 lanes (the rest exit), width 16; warp 1
    // uses its 8 lanes, width 8. Offsets below the width keep every source inside the mask.
    let mut rng = Rng(99);
    for mode in 0..4 {
        let masks: Vec<u32> = (0..40)
            .map(|t| {
                if t < 16 {
                    0xffff
                } else if t < 32 {
                    0
                } else {
                    0xff
                }
            })
            .collect();
        for _ in 0..4 {
            let bs: Vec<i32> = (0..40).map(|_| rng.below(8) as i32).collect();
            // Warp 0 at width 16 and warp 1 at width 8 need one launch each (width is per launch).
            let masks0: Vec<u32> = masks
                .iter()
                .enumerate()
                .map(|(t, &m)| if t < 32 { m } else { 0 })
                .collect();
            let masks1: Vec<u32> = masks
                .iter()
                .enumerate()
                .map(|(t, &m)| if t >= 32 { m } else { 0 })
                .collect();
            check_shfl(40, mode, 16, &masks0, &bs);
            check_shfl(40, mode, 8, &masks1, &bs);
        }
    }
}

#[test]
fn shuffles_carry_every_value_type_whole() {
    let mut rng = Rng(7);
    for order in ORDERS {
        let in_u64: Vec<u64> = (0..32).map(|_| rng.next()).collect();
        let in_f: Vec<f32> = (0..32).map(|t| t as f32 * 1.5 - 7.25).collect();
        let in_a: Vec<i32> = (0..32).map(|_| rng.next() as i32).collect();
        let mut b = Bufs {
            in_u64: in_u64.clone(),
            in_f: in_f.clone(),
            in_a: in_a.clone(),
            out_u64: vec![0; 96],
            out_f: vec![0.0; 32],
            out_u: vec![0; 32],
            out_a: vec![0; 32],
            ..Default::default()
        };
        run_block(st::vppo_simt_selftest_shfl_types, 32, order, &mut b, 0, 32).unwrap();
        for l in 0..32usize {
            // xor 1 on unsigned long long: the partner's 64 bits.
            assert_eq!(b.out_u64[l], in_u64[l ^ 1]);
            // down 3 on double: lane + 3 when <= 31, else own; the bits travel unchanged (NaNs included).
            assert_eq!(
                b.out_u64[32 + l],
                in_u64[if l + 3 <= 31 { l + 3 } else { l }]
            );
            // idx 31 - l on long long.
            assert_eq!(b.out_u64[64 + l], in_u64[31 - l]);
            // up 2 on float.
            assert_eq!(
                b.out_f[l].to_bits(),
                in_f[if l >= 2 { l - 2 } else { l }].to_bits()
            );
            // xor 4 on __half and __nv_bfloat16: the partner's 16 bits.
            let bits = (in_a[l ^ 4] & 0xffff) as u32;
            assert_eq!(b.out_u[l], bits | (bits << 16));
            // idx 7 width 8 on unsigned: lane (l & ~7) | 7.
            assert_eq!(b.out_a[l], in_a[(l & !7) | 7]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Votes, __activemask, bit functions
// ------------------------------------------------------------------------------------------------

#[test]
fn votes_follow_the_programming_guide() {
    let mut rng = Rng(3);
    for order in ORDERS {
        for case in 0..6 {
            // Case 0: full warps; case 1: even lanes only (odd lanes exit); otherwise random subsets.
            let threads = 64usize;
            let masks: Vec<u32> = match case {
                0 => vec![FULL; threads],
                1 => (0..threads)
                    .map(|t| if t % 2 == 0 { 0x5555_5555 } else { 0 })
                    .collect(),
                _ => {
                    let m = [rng.next() as u32 | 1, rng.next() as u32 | 1];
                    (0..threads)
                        .map(|t| {
                            if (m[t / 32] >> (t % 32)) & 1 == 1 {
                                m[t / 32]
                            } else {
                                0
                            }
                        })
                        .collect()
                }
            };
            let preds: Vec<i32> = (0..threads)
                .map(|_| {
                    if rng.below(3) == 0 {
                        0
                    } else {
                        rng.next() as i32 | 1
                    }
                })
                .collect();
            let preds: Vec<i32> = if case == 5 { vec![1; threads] } else { preds };
            let mut b = Bufs {
                in_a: preds.clone(),
                in_mask: masks.clone(),
                out_u: vec![0; threads],
                out_a: vec![-1; threads],
                out_b: vec![-1; threads],
                ..Default::default()
            };
            run_block(
                st::vppo_simt_selftest_vote,
                threads as u32,
                order,
                &mut b,
                0,
                32,
            )
            .unwrap();
            for t in 0..threads {
                let mask = masks[t];
                if mask == 0 {
                    continue;
                }
                let w = t / 32 * 32;
                // __ballot_sync: bit N set iff lane N is in mask and its predicate is non-zero.
                let ballot: u32 = (0..32)
                    .filter(|&l| (mask >> l) & 1 == 1 && preds[w + l] != 0)
                    .map(|l| 1u32 << l)
                    .sum();
                assert_eq!(b.out_u[t], ballot, "case {case} thread {t}");
                // __any_sync: non-zero iff some lane of mask has a non-zero predicate.
                assert_eq!(b.out_a[t] != 0, ballot != 0);
                // __all_sync: non-zero iff every lane of mask has a non-zero predicate.
                assert_eq!(b.out_b[t] != 0, ballot == mask);
            }
        }
    }
}

#[test]
fn activemask_names_the_converged_lanes_of_a_branch() {
    let mut rng = Rng(11);
    for order in ORDERS {
        let threads = 48usize;
        // -1: the thread exits; otherwise the branch is a & 1.
        let a: Vec<i32> = (0..threads).map(|_| rng.below(5) as i32 - 1).collect();
        let mut b = Bufs {
            in_a: a.clone(),
            out_u: vec![0; threads],
            out_a: vec![-1; threads],
            ..Default::default()
        };
        run_block(
            st::vppo_simt_selftest_activemask,
            threads as u32,
            order,
            &mut b,
            0,
            32,
        )
        .unwrap();
        for t in 0..threads {
            if a[t] < 0 {
                continue;
            }
            // __activemask: "the Nth bit is set if the Nth lane in the warp is active", exited threads
            // are inactive; the executor's active set at a call is the lanes of the warp that reach the
            // same call (the same side of the branch).
            let w = t / 32 * 32;
            let n = (threads - w).min(32);
            let m: u32 = (0..n)
                .filter(|&l| a[w + l] >= 0 && (a[w + l] & 1) == (a[t] & 1))
                .map(|l| 1u32 << l)
                .sum();
            assert_eq!(b.out_u[t], m, "thread {t}");
            // __shfl_sync(m, t, lowest lane of m): the lowest converged lane's thread index.
            assert_eq!(b.out_a[t], (w + m.trailing_zeros() as usize) as i32);
        }
    }
}

#[test]
fn bit_functions_follow_their_definitions() {
    let mut rng = Rng(5);
    let mut xs: Vec<u32> = vec![0, 1, 0x8000_0000, FULL, 0x0001_0000, 6];
    let mut ys: Vec<u64> = vec![0, 1, 1 << 63, u64::MAX, 1 << 40, 12];
    while xs.len() < 64 {
        xs.push(rng.next() as u32 >> rng.below(32));
        ys.push(rng.next() >> rng.below(64));
    }
    let n = xs.len();
    let mut b = Bufs {
        in_a: xs.iter().map(|&x| x as i32).collect(),
        in_u64: ys.clone(),
        out_a: vec![0; n],
        out_b: vec![0; n],
        out_u: vec![0; n],
        out_u64: vec![0; 2 * n],
        ..Default::default()
    };
    run(
        st::vppo_simt_selftest_bits,
        [2, 1, 1],
        [32, 1, 1],
        0,
        LaneOrder::Forward,
        &mut b,
        0,
        32,
        n as i32,
    )
    .unwrap();
    for i in 0..n {
        let (x, y) = (xs[i], ys[i]);
        // __popc: number of set bits; __ffs: position of the least significant set bit, from 1, 0 for 0.
        assert_eq!(b.out_a[i], x.count_ones() as i32);
        assert_eq!(
            b.out_b[i],
            if x == 0 {
                0
            } else {
                x.trailing_zeros() as i32 + 1
            }
        );
        // __brev: bit reversal.
        assert_eq!(b.out_u[i], x.reverse_bits());
        // __clz: leading zeros (32 for 0); __popcll, __ffsll, __clzll likewise on 64 bits.
        let ffsll = if y == 0 {
            0
        } else {
            y.trailing_zeros() as u64 + 1
        };
        let packed = x.leading_zeros() as u64
            | (y.count_ones() as u64) << 8
            | ffsll << 16
            | (y.leading_zeros() as u64) << 24;
        assert_eq!(b.out_u64[i], packed);
        assert_eq!(b.out_u64[n + i], y.reverse_bits());
    }
}

// ------------------------------------------------------------------------------------------------
// Errors: reported, never hung
// ------------------------------------------------------------------------------------------------

#[test]
fn warp_intrinsic_misuse_is_reported() {
    // (mode, threads, what the message must say)
    let cases: [(i32, u32, &[&str]); 8] = [
        (
            0,
            64,
            &["does not include the calling lane 5", "mask 0xffffffdf"],
        ),
        (1, 64, &["masks disagree"]),
        (2, 64, &["names lane 3", "exited"]),
        (3, 40, &["names lanes outside the warp", "8 lanes"]),
        (
            4,
            64,
            &["lane 12 reads lane 16, which is not in mask 0x0000ffff"],
        ),
        (5, 64, &["width 12 is not a power of two"]),
        (6, 64, &["width 64 is not a power of two"]),
        (7, 64, &["lanes meet at different warp operations"]),
    ];
    for order in ORDERS {
        for (mode, threads, needles) in cases {
            let (msg, _) = one_block_error(st::vppo_simt_selftest_warp_error, threads, order, mode);
            assert!(
                msg.starts_with("kernel selftest_warp_error: block (0,0,0): thread ("),
                "{msg}"
            );
            assert!(msg.contains("errors.cu:"), "{msg}");
            for n in needles {
                assert!(
                    msg.contains(n),
                    "mode {mode} {order:?}: {msg:?} lacks {n:?}"
                );
            }
        }
    }
    // The lines: mode 0 reports the call on its MARK line.
    let (msg, _) = one_block_error(st::vppo_simt_selftest_warp_error, 64, LaneOrder::Forward, 0);
    assert!(
        msg.contains(&format!(
            "thread (5,0,0): __shfl_sync at errors.cu:{}:",
            mark_line("errors.cu", "no-self")
        )),
        "{msg}"
    );
}

#[test]
fn divergent_syncthreads_is_reported_with_both_call_sites() {
    let (a, b_line) = (
        mark_line("errors.cu", "div-a"),
        mark_line("errors.cu", "div-b"),
    );
    for order in ORDERS {
        let (msg, b) = one_block_error(st::vppo_simt_selftest_divergent_barrier, 64, order, 0);
        let expected = format!(
            "kernel selftest_divergent_barrier: block (0,0,0): divergent __syncthreads: thread (0,0,0) waits at \
             errors.cu:{a}, thread (40,0,0) waits at errors.cu:{b_line}"
        );
        assert!(msg.starts_with(&expected), "{msg}\nexpected: {expected}");
        // No thread went past the barrier.
        assert!(b.out_a.iter().all(|&v| v == 0));
    }
}

#[test]
fn deadlock_is_reported_not_hung() {
    let (bar, shfl) = (
        mark_line("errors.cu", "dead-bar"),
        mark_line("errors.cu", "dead-shfl"),
    );
    for order in ORDERS {
        let (msg, _) = one_block_error(st::vppo_simt_selftest_deadlock, 64, order, 0);
        let expected = format!(
            "kernel selftest_deadlock: block (0,0,0): deadlock: thread (0,0,0) waits at __syncthreads at \
             errors.cu:{bar}, thread (1,0,0) waits at __shfl_sync (mask 0xffffffff) at errors.cu:{shfl}"
        );
        assert!(msg.starts_with(&expected), "{msg}\nexpected: {expected}");
    }
}

#[test]
fn exited_threads_count_as_arrived_at_syncthreads() {
    for order in ORDERS {
        for n in [1usize, 33, 100, 128] {
            let in_a: Vec<i32> = (0..128).map(|t| 3 * t + 1).collect();
            let mut b = Bufs {
                in_a: in_a.clone(),
                out_a: vec![-5; 128],
                ..Default::default()
            };
            run(
                st::vppo_simt_selftest_exit_barrier,
                [1, 1, 1],
                [128, 1, 1],
                512,
                order,
                &mut b,
                0,
                32,
                n as i32,
            )
            .unwrap();
            // __syncthreads waits for the threads that have not exited; each of the first n reads its
            // neighbour's value written before the barrier.
            for t in 0..n {
                assert_eq!(b.out_a[t], in_a[(t + 1) % n]);
            }
            assert!(b.out_a[n..].iter().all(|&v| v == -5));
        }
    }
}

#[test]
fn bad_launch_shapes_are_errors() {
    let mut b = Bufs::default();
    for (grid, block) in [
        ([0, 1, 1], [32, 1, 1]),
        ([1, 1, 1], [0, 1, 1]),
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [32, 32, 2]),
    ] {
        let r = run(
            st::vppo_simt_selftest_reduce,
            grid,
            block,
            0,
            LaneOrder::Forward,
            &mut b,
            0,
            32,
            0,
        );
        assert!(
            matches!(r, Err(VppoError::Kernel(ref m)) if m.contains("invalid launch")),
            "{r:?}"
        );
    }
    let r = run(
        st::vppo_simt_selftest_reduce,
        [1, 1, 1],
        [32, 1, 1],
        228 * 1024,
        LaneOrder::Forward,
        &mut b,
        0,
        32,
        0,
    );
    assert!(matches!(r, Err(VppoError::Kernel(_))));
}

// ------------------------------------------------------------------------------------------------
// Block-level algorithms, races, poisoning
// ------------------------------------------------------------------------------------------------

fn reduce(
    order: LaneOrder,
    block: u32,
    in_a: &[i32],
    in_f: &[f32],
    n: usize,
) -> (Vec<i32>, Vec<f32>) {
    let blocks = in_a.len() / n;
    let mut b = Bufs {
        in_a: in_a.to_vec(),
        in_f: in_f.to_vec(),
        out_a: vec![0; blocks],
        out_f: vec![0.0; blocks],
        ..Default::default()
    };
    run(
        st::vppo_simt_selftest_reduce,
        [blocks as u32, 1, 1],
        [block, 1, 1],
        2 * 4 * block / 32,
        order,
        &mut b,
        0,
        32,
        n as i32,
    )
    .unwrap();
    (b.out_a, b.out_f)
}

#[test]
fn block_reduction_is_exact_and_the_same_in_both_orders() {
    let mut rng = Rng(42);
    for (block, n) in [(256u32, 1000usize), (64, 77), (1024, 3000), (32, 5)] {
        let blocks = 3;
        let in_a: Vec<i32> = (0..blocks * n)
            .map(|_| rng.below(2001) as i32 - 1000)
            .collect();
        let in_f: Vec<f32> = (0..blocks * n)
            .map(|_| (rng.below(1 << 20) as f32 - 524288.0) / 4096.0)
            .collect();
        let (fa, ff) = reduce(LaneOrder::Forward, block, &in_a, &in_f, n);
        let (ra, rf) = reduce(LaneOrder::Reverse, block, &in_a, &in_f, n);
        for k in 0..blocks {
            // The sum of the block's integers, exactly.
            let s: i32 = in_a[k * n..(k + 1) * n].iter().sum();
            assert_eq!(fa[k], s);
            assert_eq!(ra[k], s);
            // The float tree is fixed by the code, not the schedule: the same bits in both orders, and
            // close to the exact sum.
            let exact: f64 = in_f[k * n..(k + 1) * n].iter().map(|&x| x as f64).sum();
            assert_eq!(ff[k].to_bits(), rf[k].to_bits());
            assert!(
                (ff[k] as f64 - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
                "{} vs {exact}",
                ff[k]
            );
        }
    }
}

#[test]
fn shared_memory_scan_is_the_same_in_both_orders() {
    let mut rng = Rng(17);
    for block in [256u32, 128, 1024, 32] {
        let blocks = 2usize;
        let len = blocks * block as usize;
        let in_a: Vec<i32> = (0..len).map(|_| rng.below(100) as i32 - 50).collect();
        for order in ORDERS {
            let mut b = Bufs {
                in_a: in_a.clone(),
                out_a: vec![0; len],
                ..Default::default()
            };
            run(
                st::vppo_simt_selftest_scan,
                [blocks as u32, 1, 1],
                [block, 1, 1],
                8 * block,
                order,
                &mut b,
                0,
                32,
                0,
            )
            .unwrap();
            // Inclusive scan within each block: out[i] = sum of in over the block up to i.
            for k in 0..blocks {
                let mut acc = 0;
                for t in 0..block as usize {
                    acc += in_a[k * block as usize + t];
                    assert_eq!(
                        b.out_a[k * block as usize + t],
                        acc,
                        "block {block} order {order:?} at {t}"
                    );
                }
            }
        }
    }
}

#[test]
fn reverse_order_exposes_a_missing_barrier() {
    let n = 64usize;
    let in_a: Vec<i32> = (0..n as i32).map(|t| 10 * t + 3).collect();
    // What the code means: out[t] = in[t] + in[t - 1] (t > 0).
    let intended: Vec<i32> = (0..n)
        .map(|t| in_a[t] + if t > 0 { in_a[t - 1] } else { 0 })
        .collect();
    let go = |order, mode| {
        let mut b = Bufs {
            in_a: in_a.clone(),
            out_a: vec![0; n],
            ..Default::default()
        };
        run(
            st::vppo_simt_selftest_race,
            [1, 1, 1],
            [n as u32, 1, 1],
            4 * n as u32,
            order,
            &mut b,
            mode,
            32,
            0,
        )
        .unwrap();
        b.out_a
    };
    // Without the barrier, forward order is right by luck: thread t - 1 ran to the end before thread t.
    assert_eq!(go(LaneOrder::Forward, 0), intended);
    // In reverse order thread t runs first and reads s[t - 1] unwritten: the poison, -1 as an int.
    let reverse = go(LaneOrder::Reverse, 0);
    assert_ne!(reverse, intended);
    for t in 1..n {
        assert_eq!(reverse[t], in_a[t] - 1);
    }
    // With the barrier both orders are right.
    assert_eq!(go(LaneOrder::Forward, 1), intended);
    assert_eq!(go(LaneOrder::Reverse, 1), intended);
}

#[test]
fn shared_memory_is_poisoned_at_each_block_start() {
    for order in ORDERS {
        let (blocks, threads) = (3usize, 64usize);
        let len = blocks * threads;
        let mut b = Bufs {
            out_u: vec![0; len],
            out_f: vec![0.0; len],
            out_a: vec![0; len],
            out_b: vec![7; blocks],
            ..Default::default()
        };
        run(
            st::vppo_simt_selftest_poison,
            [blocks as u32, 1, 1],
            [threads as u32, 1, 1],
            4 * threads as u32,
            order,
            &mut b,
            0,
            32,
            0,
        )
        .unwrap();
        // Every byte 0xFF before a block writes, even after the previous block wrote 123.0 there.
        assert!(b.out_u.iter().all(|&u| u == 0xffff_ffff));
        assert!(b.out_f.iter().all(|f| f.is_nan()));
        assert!(b.out_a.iter().all(|&i| i == -1));
        // VPPO_DYNAMIC_SHARED is 16-byte aligned.
        assert!(b.out_b.iter().all(|&r| r == 0));
    }
}

/// Shared memory ends right before an inaccessible page: 64 threads each reading s[t] of a launch
/// that asked for 32 floats fault at thread 32. The launch runs in a child process (the fault ends
/// it); the parent checks that it ended by the signal, not by finishing.
#[test]
fn reading_past_the_shared_memory_faults() {
    const CHILD: &str = "VPPO_SIMT_SHARED_OVERRUN_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let threads = 64usize;
        let mut b = Bufs {
            out_u: vec![0; threads],
            out_f: vec![0.0; threads],
            out_a: vec![0; threads],
            out_b: vec![0; 1],
            ..Default::default()
        };
        let res = run(
            st::vppo_simt_selftest_poison,
            [1, 1, 1],
            [threads as u32, 1, 1],
            4 * 32,
            LaneOrder::Forward,
            &mut b,
            0,
            32,
            0,
        );
        panic!("reading past the shared memory did not fault: {res:?}");
    }
    let run = common::run_this_binary(
        &[(CHILD, "1")],
        &[
            "--exact",
            "reading_past_the_shared_memory_faults",
            "--test-threads",
            "1",
        ],
        std::time::Duration::from_secs(120),
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        run.status.and_then(|s| s.signal()),
        Some(11),
        "expected SIGSEGV, got {:?}\n{}",
        run.status,
        run.text()
    );
}

#[test]
fn atomics_give_the_sequential_totals() {
    for order in ORDERS {
        let (blocks, threads) = (3u32, 64u32);
        let total = (blocks * threads) as i64;
        let mut b = Bufs {
            out_a: vec![0, i32::MAX, -1, -1],
            out_u: vec![0, 0],
            out_f: vec![0.0],
            out_u64: vec![0, 0, 0f64.to_bits(), 0],
            ..Default::default()
        };
        run(
            st::vppo_simt_selftest_atomics,
            [blocks, 1, 1],
            [threads, 1, 1],
            0,
            order,
            &mut b,
            0,
            32,
            0,
        )
        .unwrap();
        // Each atomic returns the old value and stores op(old, v), so the totals are those of any
        // sequential order of the g = 0 .. total-1 updates.
        assert_eq!(b.out_a[0] as i64, total);
        assert_eq!(b.out_a[1], 0);
        assert_eq!(b.out_a[2] as i64, total - 1);
        assert!((0..total).contains(&(b.out_a[3] as i64)));
        assert_eq!(b.out_u[0], FULL);
        assert_eq!(b.out_u[1] as i64, 2 * total);
        assert_eq!(b.out_f[0], 0.5 * total as f32);
        assert_eq!(b.out_u64[0] as i64, total * (total - 1) / 2);
        assert_eq!(b.out_u64[1] as i64, -(total - 1));
        assert_eq!(f64::from_bits(b.out_u64[2]), 0.25 * total as f64);
        assert_eq!(b.out_u64[3], ((total - 1) as u64) << 33);
    }
}

#[test]
fn thread_and_block_coordinates_and_lane_numbering() {
    for order in ORDERS {
        let (grid, block) = ([2u32, 3, 1], [4u32, 3, 2]);
        let nt = (block[0] * block[1] * block[2]) as usize;
        let len = nt * 6;
        let mut b = Bufs {
            out_u64: vec![0; len],
            out_u: vec![0; len],
            out_a: vec![0; len],
            out_b: vec![0; len],
            ..Default::default()
        };
        run(
            st::vppo_simt_selftest_dims,
            grid,
            block,
            0,
            order,
            &mut b,
            0,
            32,
            0,
        )
        .unwrap();
        let mut g = 0;
        for bz in 0..1u64 {
            for by in 0..3u64 {
                for bx in 0..2u64 {
                    for tz in 0..2u64 {
                        for ty in 0..3u64 {
                            for tx in 0..4u64 {
                                // threadIdx / blockIdx: x fastest, then y, then z.
                                let want =
                                    tx | ty << 10 | tz << 20 | bx << 30 | by << 40 | bz << 50;
                                assert_eq!(b.out_u64[g], want);
                                assert_eq!(b.out_u[g], 4 | 3 << 10 | 2 << 20);
                                assert_eq!(b.out_a[g], 2 | 3 << 10 | 1 << 20);
                                // Lanes are linear thread indices: threadIdx.y == 1 holds for linear
                                // ids 4..7 and 16..19 (z = 0 and z = 1).
                                assert_eq!(b.out_b[g] as u32, 0xf0 | 0xf0000);
                                g += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 16-bit floats
// ------------------------------------------------------------------------------------------------

fn convert(inputs: &[f32], bits: &[u16]) -> Bufs {
    let n = inputs.len().max(bits.len());
    let mut in_f = inputs.to_vec();
    in_f.resize(n, 0.0);
    let mut in_a: Vec<i32> = bits.iter().map(|&b| b as i32).collect();
    in_a.resize(n, 0);
    let mut b = Bufs {
        in_f,
        in_a,
        out_u: vec![0; n],
        out_a: vec![0; n],
        out_f: vec![0.0; 2 * n],
        ..Default::default()
    };
    let blocks = n.div_ceil(256) as u32;
    run(
        st::vppo_simt_selftest_convert,
        [blocks, 1, 1],
        [256, 1, 1],
        0,
        LaneOrder::Forward,
        &mut b,
        0,
        32,
        n as i32,
    )
    .unwrap();
    b
}

#[test]
fn float_to_bf16_and_half_round_to_nearest_even() {
    // (input, bf16 bits, half bits): IEEE 754 round-to-nearest-even, overflow to inf.
    let cases: &[(f32, u16, u16)] = &[
        (1.0, 0x3f80, 0x3c00),
        (-0.0, 0x8000, 0x8000),
        // bf16 ties: 1 + 2^-8 lies halfway between 0x3f80 and 0x3f81: to even 0x3f80; 1 + 3 * 2^-8
        // between 0x3f81 and 0x3f82: to even 0x3f82. (In half both are exact: 0x3c04, 0x3c0c.)
        (f32::from_bits(0x3f80_8000), 0x3f80, 0x3c04),
        (f32::from_bits(0x3f81_8000), 0x3f82, 0x3c0c),
        // half ties: 1 + 2^-11 between 0x3c00 and 0x3c01: to 0x3c00; 1 + 3 * 2^-11: to 0x3c02.
        (1.0 + 2f32.powi(-11), 0x3f80, 0x3c00),
        (1.0 + 3.0 * 2f32.powi(-11), 0x3f80, 0x3c02),
        // Largest half 65504; 65520 is halfway to 65536 (past the largest): ties to even = inf.
        (65504.0, 0x4780, 0x7bff),
        (65519.996, 0x4780, 0x7bff),
        (65520.0, 0x4780, 0x7c00),
        // f32::MAX rounds up to inf in bf16.
        (f32::MAX, 0x7f80, 0x7c00),
        (f32::INFINITY, 0x7f80, 0x7c00),
        (f32::NEG_INFINITY, 0xff80, 0xfc00),
        // Half subnormals: 2^-24 is the smallest (0x0001); 2^-25 is halfway to 0: ties to even = 0;
        // 1.5 * 2^-24 is halfway between 1 and 2 units: to 2; 2^-14 is the smallest normal.
        (2f32.powi(-24), 0x3380, 0x0001),
        (2f32.powi(-25), 0x3300, 0x0000),
        (1.5 * 2f32.powi(-24), 0x33c0, 0x0002),
        (2f32.powi(-14), 0x3880, 0x0400),
        (-3.0 * 2f32.powi(-20), 0xb640, 0x8030),
    ];
    let inputs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let b = convert(&inputs, &[]);
    for (i, &(x, bf, h)) in cases.iter().enumerate() {
        let want = bf as u32 | (h as u32) << 16;
        assert_eq!(
            b.out_u[i], want,
            "{x:e}: got {:#010x} want {want:#010x}",
            b.out_u[i]
        );
        assert_eq!(b.out_a[i] as u32, want, "_rn variants of {x:e}");
    }
    // NaN stays NaN (exponent all ones, mantissa non-zero) in both formats.
    let b = convert(&[f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001)], &[]);
    for i in 0..3 {
        let (bf, h) = (b.out_u[i] & 0xffff, b.out_u[i] >> 16);
        assert!(bf & 0x7f80 == 0x7f80 && bf & 0x7f != 0, "bf16 {bf:#x}");
        assert!(h & 0x7c00 == 0x7c00 && h & 0x3ff != 0, "half {h:#x}");
    }
    // A sweep against the `half` crate's IEEE conversions (an independent implementation).
    let mut rng = Rng(2024);
    let inputs: Vec<f32> = (0..20000)
        .map(|i| {
            if i % 2 == 0 {
                f32::from_bits(rng.next() as u32)
            } else {
                (rng.next() as u32 as f32 / 4e9 - 0.5) * 2f32.powi((i % 60) - 30)
            }
        })
        .collect();
    let b = convert(&inputs, &[]);
    for (i, &x) in inputs.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        let want = half::bf16::from_f32(x).to_bits() as u32
            | (half::f16::from_f32(x).to_bits() as u32) << 16;
        assert_eq!(b.out_u[i], want, "{x:e} ({:#010x})", x.to_bits());
    }
}

#[test]
fn bf16_and_half_to_float_are_exact_for_every_bit_pattern() {
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let b = convert(&[], &bits);
    for (i, &h) in bits.iter().enumerate() {
        // half: sign, 5-bit exponent (bias 15; 0 = subnormal m * 2^-24; 31 = inf / NaN), 10-bit mantissa.
        let hf = half::f16::from_bits(h).to_f32();
        let got = b.out_f[2 * i];
        assert!(
            got.to_bits() == hf.to_bits() || (got.is_nan() && hf.is_nan()),
            "half {h:#06x}: {got:e} vs {hf:e}"
        );
        // bf16: the upper 16 bits of an f32.
        let bf = f32::from_bits((h as u32) << 16);
        assert_eq!(b.out_f[2 * i + 1].to_bits(), bf.to_bits(), "bf16 {h:#06x}");
    }
}

// ------------------------------------------------------------------------------------------------
// Concurrency, recovery after errors, speed
// ------------------------------------------------------------------------------------------------

#[test]
fn launches_from_several_threads_at_once_are_independent() {
    let handles: Vec<_> = (0..4u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut rng = Rng(1000 + k);
                let n = 500;
                for round in 0..10 {
                    let in_a: Vec<i32> = (0..4 * n).map(|_| rng.below(1000) as i32).collect();
                    let in_f = vec![1.0f32; 4 * n];
                    let order = if (round + k) % 2 == 0 {
                        LaneOrder::Forward
                    } else {
                        LaneOrder::Reverse
                    };
                    let (sums, _) = reduce(order, 256, &in_a, &in_f, n);
                    for (blk, s) in sums.iter().enumerate() {
                        assert_eq!(*s, in_a[blk * n..(blk + 1) * n].iter().sum::<i32>());
                    }
                    // An error on this thread does not disturb the others, nor the next launch here.
                    let mut b = Bufs {
                        out_a: vec![0; 64],
                        ..Default::default()
                    };
                    assert!(
                        run_block(st::vppo_simt_selftest_deadlock, 64, order, &mut b, 0, 32)
                            .is_err()
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Speed of the executor: a 256-thread block reduction over 10k blocks (11 shuffles and a barrier per
/// thread per block). Run with `cargo test --release --test simt_executor -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_of_a_block_reduction_launch() {
    let (blocks, n) = (10_000usize, 1024usize);
    let in_a = vec![1i32; blocks * n];
    let in_f = vec![0.5f32; blocks * n];
    for order in ORDERS {
        let t0 = std::time::Instant::now();
        let (sums, _) = reduce(order, 256, &in_a, &in_f, n);
        let dt = t0.elapsed().as_secs_f64();
        assert!(sums.iter().all(|&s| s == n as i32));
        // Per block: 256 threads x (10 shuffles + 1 barrier) + 32 x 10 shuffles scheduling points.
        let switches = blocks as f64 * (256.0 * 11.0 + 320.0);
        eprintln!(
            "{order:?}: {blocks} blocks x 256 threads in {dt:.3} s ({:.1} us per block, {:.1} M waits/s)",
            dt * 1e6 / blocks as f64,
            switches / dt / 1e6
        );
    }
}

// -------------------------------------------------------------------------------------------------
// Run-ahead schedule, grid cap, race check
// -------------------------------------------------------------------------------------------------

/// The line of kernels/simt/tests/<file> that ends in the comment `/* line: <tag> */`.
fn tagged_line(file: &str, tag: &str) -> String {
    let path = format!("{}/kernels/simt/tests/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let marker = format!("/* line: {tag} */");
    let i = text
        .lines()
        .position(|l| l.trim_end().ends_with(&marker))
        .unwrap_or_else(|| panic!("no line tagged {tag:?} in {path}"));
    format!("{file}:{}", i + 1)
}

/// Runs selftest_ordering (one block of 64 threads) in `mode`, race check on or off.
fn racecheck(order: LaneOrder, mode: i32, check: bool) -> Result<Vec<i32>, VppoError> {
    let n = 64usize;
    let mut b = Bufs {
        out_a: vec![0; n],
        ..Default::default()
    };
    let m = vppo::simt::TestMode {
        race_check: check,
        ..Default::default()
    };
    vppo::simt::with_test_mode(m, || {
        run(
            st::vppo_simt_selftest_ordering,
            [1, 1, 1],
            [n as u32, 1, 1],
            4 * (n as u32 + 1),
            order,
            &mut b,
            mode,
            32,
            0,
        )
    })?;
    Ok(b.out_a)
}

const ALL_ORDERS: [LaneOrder; 3] = [LaneOrder::Forward, LaneOrder::Reverse, LaneOrder::RunAhead];

/// Every racy pattern is reported in every schedule (the check follows the synchronization, not the
/// interleaving that ran), naming the kernel, block, byte, both threads and both source lines; every
/// ordered one passes and gives the values the code means.
#[test]
fn race_check_reports_unordered_shared_accesses() {
    for order in ALL_ORDERS {
        for mode in [1, 2, 4, 5, 7, 10] {
            let out = racecheck(order, mode, true).unwrap_or_else(|e| {
                panic!("{order:?} mode {mode}: a race reported in ordered code: {e}")
            });
            let want: Vec<i32> = (0..64i32)
                .map(|t| match mode {
                    1 => (t + 1) % 64,
                    2 | 4 | 5 => t ^ 1,
                    7 => i32::from(t == 0) * 64,
                    _ => 7,
                })
                .collect();
            assert_eq!(out, want, "{order:?} mode {mode}");
        }
        for mode in [0, 3, 6, 8, 9, 11] {
            let err = racecheck(order, mode, true)
                .expect_err("a race went unreported")
                .to_string();
            assert!(
                err.contains("kernel selftest_ordering: block (0,0,0): race on shared memory byte"),
                "{order:?} mode {mode}: {err}"
            );
            assert!(
                err.contains("with no __syncthreads, warp operation or atomic ordering the two"),
                "{err}"
            );
            // both accesses, each with its kind ("writes"/"wrote", "reads"/"read", "does/did an atomic
            // on") and its line (which one came first depends on the order)
            let lines: &[(&str, &str)] = match mode {
                0 => &[("wr", "write 0"), ("read", "read 0")],
                3 => &[("read", "read 3")],
                8 => &[("atomic on", "atomic 8"), ("read", "read 8")],
                9 => &[("wr", "write 9"), ("read", "read 9")],
                11 => &[("wr", "write 11")],
                _ => &[],
            };
            for (what, tag) in lines {
                let line = tagged_line("race.cu", tag);
                assert!(
                    err.contains(&format!(" it at {line}")) && err.contains(what),
                    "{order:?} mode {mode}: no {what:?} at {line} in: {err}"
                );
            }
        }
    }
}

/// Without the race check the racy patterns run (the executor's other checks do not see them), and the
/// planted race of selftest_race is reported once it is on, in both lane orders.
#[test]
fn race_check_is_a_test_mode() {
    for order in ALL_ORDERS {
        for mode in [0, 3, 6, 8, 9, 11] {
            racecheck(order, mode, false).unwrap();
        }
    }
    let n = 64usize;
    for order in ORDERS {
        for (mode, racy) in [(0, true), (1, false)] {
            let mut b = Bufs {
                in_a: (0..n as i32).collect(),
                out_a: vec![0; n],
                ..Default::default()
            };
            let m = vppo::simt::TestMode {
                race_check: true,
                ..Default::default()
            };
            let r = vppo::simt::with_test_mode(m, || {
                run(
                    st::vppo_simt_selftest_race,
                    [1, 1, 1],
                    [n as u32, 1, 1],
                    4 * n as u32,
                    order,
                    &mut b,
                    mode,
                    32,
                    0,
                )
            });
            assert_eq!(r.is_err(), racy, "{order:?} mode {mode}: {r:?}");
        }
    }
}

/// The race check finds no race in the self tests' reduction and scan (barriers between every write
/// and the reads of another thread), in every schedule.
#[test]
fn race_check_passes_ordered_block_algorithms() {
    let m = vppo::simt::TestMode {
        race_check: true,
        ..Default::default()
    };
    for order in ALL_ORDERS {
        let block = 256usize;
        let mut b = Bufs {
            in_a: (0..block as i32).collect(),
            out_a: vec![0; block],
            ..Default::default()
        };
        vppo::simt::with_test_mode(m, || {
            run(
                st::vppo_simt_selftest_scan,
                [1, 1, 1],
                [block as u32, 1, 1],
                8 * block as u32,
                order,
                &mut b,
                0,
                32,
                0,
            )
        })
        .unwrap();
        let want: Vec<i32> = (0..block as i32).map(|i| i * (i + 1) / 2).collect();
        assert_eq!(b.out_a, want, "{order:?}");
        let n = 1000;
        let mut b = Bufs {
            in_a: (0..2 * n).collect(),
            in_f: vec![0.5; 2 * n as usize],
            out_a: vec![0; 2],
            out_f: vec![0.0; 2],
            ..Default::default()
        };
        vppo::simt::with_test_mode(m, || {
            run(
                st::vppo_simt_selftest_reduce,
                [2, 1, 1],
                [128, 1, 1],
                8 * 4,
                order,
                &mut b,
                0,
                32,
                n,
            )
        })
        .unwrap();
        // block b sums in_a[b n .. (b + 1) n)
        assert_eq!(b.out_a, [(n - 1) * n / 2, (3 * n - 1) * n / 2], "{order:?}");
        assert_eq!(b.out_f, [500.0, 500.0]);
    }
}

/// Run-ahead: the leading warp runs to the barrier before any other warp starts, so without the
/// barrier a thread of warp 0 reads a neighbour of warp 1 that has not run yet (the poison).
#[test]
fn run_ahead_lets_one_warp_go_first() {
    let n = 64usize;
    let go = |mode| {
        let mut b = Bufs {
            in_a: (0..n as i32).map(|t| 10 * t + 3).collect(),
            out_a: vec![0; n],
            ..Default::default()
        };
        run(
            st::vppo_simt_selftest_race,
            [1, 1, 1],
            [n as u32, 1, 1],
            4 * n as u32,
            LaneOrder::RunAhead,
            &mut b,
            mode,
            32,
            0,
        )
        .unwrap();
        b.out_a
    };
    // Block 0 starts with warp 0 ahead: thread 32 (warp 1) reads s[31], written by the finished warp 0;
    // warp 0 never reads warp 1's part. Within warp 0, lanes run in order: right by luck.
    let intended: Vec<i32> = (0..n as i32)
        .map(|t| 10 * t + 3 + if t > 0 { 10 * (t - 1) + 3 } else { 0 })
        .collect();
    assert_eq!(go(0), intended);
    assert_eq!(go(1), intended);
    // The scan with its barriers is right under run-ahead too.
    let block = 128usize;
    let mut b = Bufs {
        in_a: vec![1; block],
        out_a: vec![0; block],
        ..Default::default()
    };
    run(
        st::vppo_simt_selftest_scan,
        [1, 1, 1],
        [block as u32, 1, 1],
        8 * block as u32,
        LaneOrder::RunAhead,
        &mut b,
        0,
        32,
        0,
    )
    .unwrap();
    assert_eq!(b.out_a, (1..=block as i32).collect::<Vec<_>>());
}

/// The grid cap runs at most that many blocks in x and reports gridDim.x as the cap (0: no cap).
#[test]
fn grid_cap_shrinks_the_grid() {
    let blocks = 5usize;
    for cap in [0u32, 1, 2, 3, 7] {
        // selftest_dims, one thread per block: out_a[b] = gridDim.x, out_u64[b] = blockIdx.x << 30
        let mut b = Bufs {
            out_a: vec![-1; blocks],
            out_b: vec![-1; blocks],
            out_u: vec![0; blocks],
            out_u64: vec![u64::MAX; blocks],
            ..Default::default()
        };
        let m = vppo::simt::TestMode {
            grid_cap: cap,
            ..Default::default()
        };
        vppo::simt::with_test_mode(m, || {
            run(
                st::vppo_simt_selftest_dims,
                [blocks as u32, 1, 1],
                [1, 1, 1],
                0,
                LaneOrder::Forward,
                &mut b,
                0,
                32,
                0,
            )
        })
        .unwrap();
        let ran = if cap == 0 {
            blocks
        } else {
            blocks.min(cap as usize)
        };
        for g in 0..blocks {
            if g < ran {
                assert_eq!(
                    b.out_a[g],
                    ran as i32 | 1 << 10 | 1 << 20,
                    "cap {cap} block {g}"
                );
                assert_eq!(b.out_u64[g], (g as u64) << 30, "cap {cap} block {g}");
            } else {
                assert_eq!(
                    (b.out_a[g], b.out_u64[g]),
                    (-1, u64::MAX),
                    "cap {cap}: block {g} ran"
                );
            }
        }
    }
    // the mode is per OS thread and restored: a launch after with_test_mode runs the whole grid
    assert_eq!(
        vppo::simt::set_test_mode(Default::default()),
        Default::default()
    );
}
