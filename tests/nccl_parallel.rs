//! `NcclGroup` (src/parallel/nccl.rs, NCCL through cudarc) on the fake CUDA driver with 4 devices and
//! the fake NCCL library (tests/fake_nccl/libnccl.c): ranks are threads, rank r on `Device::Cuda(r)`.
//! Data-, vocabulary- and sequence-parallel forward and backward over NCCL groups of 1, 2 and 4 ranks,
//! and data over vocabulary groups on a 2 x 2 grid, give every rank the same bits as a `ThreadGroup` of the same ranks on the same devices (outputs
//! compared through their Debug text, which round-trips every f32 and f64), and together the
//! single-process result to rounding (the mask exactly). Bad input on one rank is an error on every
//! rank; ranks that disagree on a length, two ranks on one GPU, and a missing libnccl are clear errors.
//! The layouts on batches in GPU memory (`DeviceBatch`: `forward_device_data_parallel`) give the
//! host path's bits on the same GPUs, over thread and NCCL groups, and bad input on one rank is an
//! error on every rank there too.
//!
//! `cargo test` runs the parent, which re-runs this binary with the fakes installed
//! (`all_tests_through_the_fake_nccl_library`); the other tests run in that child only (and with
//! VPPO_TEST_DEVICE=cuda and a real NCCL on as many GPUs as there are, groups up to that size).

mod common;

use std::sync::Arc;

use common::{seeded_batch, BatchSpec};
use cudarc::driver::CudaSlice;
use vppo::cuda::{Borrowed, Gpu};
use vppo::{
    Aggregation, Collective, Device, DeviceBatch, DeviceLogits, DeviceLogitsMut, Dtype, GradMut,
    NcclGroup, NcclId, OwnedBatch, ReduceOp, ThreadGroup, VocabShard, Vppo, VppoConfig, VppoError,
    VppoOutput,
};

/// Fake devices in the child process, one per rank of the largest group.
const DEVICES: usize = 4;

/// The GPUs the NCCL tests of this process may use, or None when this process does not run them.
fn gpus() -> Option<usize> {
    if common::fake_nccl::active() {
        common::fake_nccl::install();
        return Some(DEVICES);
    }
    if std::env::var("VPPO_TEST_DEVICE").as_deref() == Ok("cuda") {
        // a real GPU: only where NCCL is installed, with one rank per GPU
        if NcclId::new().is_ok() {
            let n = cudarc::driver::CudaContext::device_count().unwrap_or(0);
            return Some(n.max(0) as usize);
        }
    }
    eprintln!("skipped: runs in the child of all_tests_through_the_fake_nccl_library");
    None
}

/// The group sizes to test on `gpus` devices.
fn sizes(gpus: usize) -> Vec<usize> {
    [1, 2, 4].into_iter().filter(|&s| s <= gpus).collect()
}

#[test]
fn all_tests_through_the_fake_nccl_library() {
    if std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        eprintln!("skipped: this process already runs under VPPO_TEST_DEVICE");
        return;
    }
    if !vppo::cuda::kernels_built() {
        eprintln!("skipped: this build has no CUDA kernels (nvcc was not found at build time)");
        return;
    }
    let devices = DEVICES.to_string();
    let run = common::run_this_binary(
        &[
            ("VPPO_TEST_DEVICE", common::fake_cuda::MODE),
            ("VPPO_FAKE_CUDA_DEVICES", devices.as_str()),
            ("VPPO_TEST_NCCL", common::fake_nccl::MODE),
        ],
        &[
            "--skip",
            "all_tests_through_the_fake_nccl_library",
            "--test-threads",
            "2",
        ],
        std::time::Duration::from_secs(600),
    );
    let text = run.text();
    let status = run
        .status
        .unwrap_or_else(|| panic!("the tests on the fake NCCL library ran over 600 s:\n{text}"));
    assert!(
        status.success(),
        "the tests failed on the fake NCCL library:\n{text}"
    );
    let summary: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("test result"))
        .collect();
    eprintln!("fake NCCL library: {summary:?}");
}

/// Runs `f(rank, group)` on one thread per rank of a new NCCL group of `size`, rank r on GPU r, and
/// returns the results in rank order; a rank that has not returned after 60 s fails the test.
fn on_nccl_ranks<T: Send + 'static>(
    size: usize,
    f: impl Fn(usize, &NcclGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let id = NcclId::new().unwrap();
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for rank in 0..size {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let g = NcclGroup::new(rank, rank, size, &id)
                .unwrap_or_else(|e| panic!("rank {rank} of {size}: {e}"));
            let r = f(rank, &g);
            tx.send((rank, r)).unwrap();
        });
    }
    let mut out: Vec<Option<T>> = (0..size).map(|_| None).collect();
    for _ in 0..size {
        let (rank, r) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a rank hangs or panicked: no result within 60 s");
        out[rank] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// The same on a `ThreadGroup`, rank r on GPU r.
fn on_thread_ranks<T: Send + 'static>(
    size: usize,
    f: impl Fn(usize, &ThreadGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    common::on_ranks(size, f)
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    got == want || (got - want).abs() <= tol * want.abs().max(1.0)
}

fn grad(vppo: &Vppo, batch: &vppo::Batch, out: &VppoOutput) -> vppo::Result<Vec<f32>> {
    let mut g = vec![0.0f32; batch.targets.len() * batch.vocab];
    vppo.backward_into(batch, out, GradMut::F32(&mut g))?;
    Ok(g)
}

/// Every rank's output and gradient, as text that differs whenever a bit of a value does.
fn text(got: &[(VppoOutput, Vec<f32>)]) -> String {
    format!("{got:?}")
}

fn configs() -> Vec<VppoConfig> {
    vec![
        VppoConfig::default(),
        VppoConfig {
            aggregation: Aggregation::SeqMeanTokenMean,
            kl_penalty: vppo::KlPenalty::K3,
            kl_coef: 0.5,
            ..VppoConfig::default()
        },
    ]
}

fn with_ref_logp(mut full: OwnedBatch) -> Arc<OwnedBatch> {
    full.ref_logp = Some(
        full.old_logp
            .iter()
            .enumerate()
            .map(|(t, &x)| x + (t as f32 * 0.7).sin())
            .collect(),
    );
    Arc::new(full)
}

#[test]
fn nccl_collectives_are_the_thread_group_s_bits() {
    let Some(gpus) = gpus() else { return };
    fn exchange(rank: usize, g: &dyn Collective) -> vppo::Result<Vec<f64>> {
        assert_eq!(g.rank(), rank);
        // sums whose value depends on the order of the additions
        let mut s = [
            0.1 * (rank + 1) as f64,
            1e16 * (-1f64).powi(rank as i32),
            3.0,
        ];
        g.all_reduce(&mut s, ReduceOp::Sum)?;
        let mut m = [rank as f64, -(rank as f64), f64::NEG_INFINITY];
        g.all_reduce(&mut m, ReduceOp::Max)?;
        let gathered = g.all_gather(&[rank as f64, 0.5])?;
        let empty = g.all_gather(&[])?;
        let mut out = s.to_vec();
        out.extend(m);
        out.extend(gathered);
        out.extend(empty);
        Ok(out)
    }
    for size in sizes(gpus) {
        let nccl = on_nccl_ranks(size, move |rank, g| {
            assert_eq!((g.size(), g.gpu().ordinal()), (size, rank));
            exchange(rank, g)
        });
        let threads = on_thread_ranks(size, |rank, g| exchange(rank, g));
        let nccl: Vec<Vec<u64>> = nccl
            .into_iter()
            .map(|r| r.unwrap().iter().map(|x| x.to_bits()).collect())
            .collect();
        let threads: Vec<Vec<u64>> = threads
            .into_iter()
            .map(|r| r.unwrap().iter().map(|x| x.to_bits()).collect())
            .collect();
        assert_eq!(nccl, threads, "{size} ranks");
        for r in &nccl[1..] {
            assert_eq!(r, &nccl[0], "{size} ranks: ranks differ");
        }
        // different lengths on different ranks: an error on every rank, not a hang
        if size > 1 {
            let got = on_nccl_ranks(size, |rank, g| {
                let mut v = vec![1.0; rank + 1];
                g.all_reduce(&mut v, ReduceOp::Sum)
            });
            for r in &got {
                assert!(
                    matches!(r, Err(VppoError::Kernel(m)) if m.contains("different lengths")),
                    "{r:?}"
                );
            }
        }
    }
}

#[test]
fn data_parallel_over_nccl_is_the_thread_group_result() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::Bf16][seed as usize % 2],
            groups: (2, 5),
            group_size: 2,
            max_len: 9,
            ..BatchSpec::default()
        };
        let full = with_ref_logp(seeded_batch(seed, &spec));
        let b_count = full.advantages.len();
        for cfg in configs() {
            let single = Vppo::new(cfg.clone(), Device::Cuda(0)).unwrap();
            let want = single.forward(&full.batch()).unwrap();
            let want_grad = grad(&single, &full.batch(), &want).unwrap();
            for size in sizes(gpus) {
                // whole groups of 2 responses per rank, uneven, the last rank possibly empty
                let mut cut: Vec<usize> = (0..size).map(|r| (b_count / 2 * r / size) * 2).collect();
                cut.push(b_count);
                let case = format!("seed {seed}, {cfg:?}, {size} ranks {cut:?}");
                let rank_work = {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    move |rank: usize, g: &dyn Collective| {
                        let mine = common::part(&full, cut[rank], cut[rank + 1], 0, full.vocab);
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        let (out, global) = vppo.forward_data_parallel(&mine.batch(), g)?;
                        let gr = grad(&global, &mine.batch(), &out)?;
                        Ok::<_, VppoError>((out, gr))
                    }
                };
                let work = Arc::new(rank_work);
                let w = work.clone();
                let nccl = on_nccl_ranks(size, move |rank, g| w(rank, g));
                let w = work.clone();
                let threads = on_thread_ranks(size, move |rank, g| w(rank, g));
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (nccl, threads) = (unwrap(nccl), unwrap(threads));
                assert_eq!(text(&nccl), text(&threads), "{case}: NCCL vs threads");
                let loss: f64 = nccl.iter().map(|(o, _)| o.loss).sum();
                assert!(
                    close(loss, want.loss, 1e-5),
                    "{case}: loss {loss} vs {}",
                    want.loss
                );
                let mask: Vec<u8> = nccl
                    .iter()
                    .flat_map(|(o, _)| o.tokens.mask.clone())
                    .collect();
                assert_eq!(mask, want.tokens.mask, "{case}: mask");
                let g: Vec<f32> = nccl.iter().flat_map(|(_, g)| g.clone()).collect();
                assert_eq!(g.len(), want_grad.len(), "{case}");
                for (i, (&x, &w)) in g.iter().zip(&want_grad).enumerate() {
                    assert!(
                        close(x as f64, w as f64, 1e-5),
                        "{case}: grad {i}: {x} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn vocab_parallel_over_nccl_is_the_thread_group_result() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::F16][seed as usize % 2],
            vocab: (5, 300),
            groups: (1, 3),
            max_len: 8,
            ..BatchSpec::default()
        };
        let full = with_ref_logp(seeded_batch(seed, &spec));
        let v = full.vocab;
        for cfg in configs() {
            let single = Vppo::new(cfg.clone(), Device::Cuda(0)).unwrap();
            let want = single.forward(&full.batch()).unwrap();
            let want_grad = grad(&single, &full.batch(), &want).unwrap();
            for size in sizes(gpus).into_iter().filter(|&s| s <= v) {
                // uneven shards, each at least one column
                let mut cut: Vec<usize> = (0..size).map(|r| (v * r * r) / (size * size)).collect();
                for r in 1..size {
                    cut[r] = cut[r].max(cut[r - 1] + 1);
                }
                cut.push(v);
                let case = format!("seed {seed}, V {v}, {cfg:?}, {size} shards {cut:?}");
                let work = {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    Arc::new(move |rank: usize, g: &dyn Collective| {
                        let all = full.advantages.len();
                        let mine = common::part(&full, 0, all, cut[rank], cut[rank + 1]);
                        let at = VocabShard {
                            start: cut[rank],
                            total: full.vocab,
                        };
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        let out = vppo.forward_vocab_parallel(&mine.batch(), at, g)?;
                        let mut gr = vec![0.0f32; mine.targets.len() * mine.vocab];
                        vppo.backward_vocab_parallel(
                            &mine.batch(),
                            at,
                            &out,
                            GradMut::F32(&mut gr),
                        )?;
                        Ok::<_, VppoError>((out, gr))
                    })
                };
                let w = work.clone();
                let nccl = on_nccl_ranks(size, move |rank, g| w(rank, g));
                let w = work.clone();
                let threads = on_thread_ranks(size, move |rank, g| w(rank, g));
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (nccl, threads) = (unwrap(nccl), unwrap(threads));
                assert_eq!(text(&nccl), text(&threads), "{case}: NCCL vs threads");
                let o = &nccl[0].0;
                for (r, (other, _)) in nccl.iter().enumerate() {
                    assert_eq!(
                        format!("{other:?}"),
                        format!("{o:?}"),
                        "{case}: rank {r} differs"
                    );
                }
                assert!(
                    close(o.loss, want.loss, 1e-5),
                    "{case}: loss {} vs {}",
                    o.loss,
                    want.loss
                );
                assert_eq!(o.tokens.mask, want.tokens.mask, "{case}: mask");
                for (row, wrow) in want_grad.chunks(v).enumerate() {
                    for (r, (_, gr)) in nccl.iter().enumerate() {
                        let w = cut[r + 1] - cut[r];
                        for (j, &x) in gr[row * w..(row + 1) * w].iter().enumerate() {
                            let y = wrow[cut[r] + j];
                            assert!(
                                close(x as f64, y as f64, 2e-5),
                                "{case}: grad [{row}, {}]: {x} vs {y}",
                                cut[r] + j
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sequence_parallel_over_nccl_is_the_thread_group_result() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::Bf16, Dtype::F32][seed as usize % 2],
            groups: (2, 3),
            group_size: 2,
            max_len: 12,
            ..BatchSpec::default()
        };
        let full = with_ref_logp(seeded_batch(seed, &spec));
        let n = full.targets.len();
        for cfg in configs() {
            let single = Vppo::new(cfg.clone(), Device::Cuda(0)).unwrap();
            let want = single.forward(&full.batch()).unwrap();
            for size in sizes(gpus).into_iter().filter(|&s| s <= n) {
                // token cuts, each rank at least one token: responses split across ranks
                let cut: Vec<usize> = (0..=size).map(|r| n * r / size).collect();
                let case = format!("seed {seed}, {cfg:?}, {size} ranks, cuts {cut:?}");
                let work = {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    Arc::new(move |rank: usize, g: &dyn Collective| {
                        let (mine, continues) = common::pieces(&full, cut[rank], cut[rank + 1]);
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        let out = vppo.forward_sequence_parallel(&mine.batch(), continues, g)?;
                        let mut gr = vec![0.0f32; mine.targets.len() * mine.vocab];
                        vppo.backward_sequence_parallel(
                            &mine.batch(),
                            &out,
                            GradMut::F32(&mut gr),
                        )?;
                        Ok::<_, VppoError>((out, gr))
                    })
                };
                let w = work.clone();
                let nccl = on_nccl_ranks(size, move |rank, g| w(rank, g));
                let w = work.clone();
                let threads = on_thread_ranks(size, move |rank, g| w(rank, g));
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (nccl, threads) = (unwrap(nccl), unwrap(threads));
                assert_eq!(text(&nccl), text(&threads), "{case}: NCCL vs threads");
                let mask: Vec<u8> = nccl
                    .iter()
                    .flat_map(|(o, _)| o.tokens.mask.clone())
                    .collect();
                assert_eq!(mask, want.tokens.mask, "{case}: mask");
                for (r, (o, _)) in nccl.iter().enumerate() {
                    assert!(
                        close(o.loss, want.loss, 1e-5),
                        "{case}: rank {r} loss {} vs {}",
                        o.loss,
                        want.loss
                    );
                }
            }
        }
    }
}

/// Runs `f(d, i, inner, data)` on a 2 x 2 grid of ranks, rank (d, i) on GPU 2 d + i: `inner` its
/// replica d's vocabulary group (rank i), `data` the data group of inner position i (rank d), both
/// NCCL groups when `nccl`, else thread groups. Results in (d, i) order.
fn on_grid<T: Send + 'static>(
    nccl: bool,
    f: impl Fn(usize, usize, &dyn Collective, &dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    if nccl {
        let ids: Vec<[NcclId; 2]> = (0..2)
            .map(|_| [NcclId::new().unwrap(), NcclId::new().unwrap()])
            .collect();
        for k in 0..4 {
            let (d, i, f, tx, ids) = (k / 2, k % 2, f.clone(), tx.clone(), ids.clone());
            std::thread::spawn(move || {
                // every rank joins its inner group first, then its data group: no rank waits on a
                // group whose members are all blocked in another
                let inner = NcclGroup::new(k, i, 2, &ids[0][d]).unwrap();
                let data = NcclGroup::new(k, d, 2, &ids[1][i]).unwrap();
                tx.send((k, f(d, i, &inner, &data))).unwrap();
            });
        }
    } else {
        let groups = || -> Vec<Vec<Option<ThreadGroup>>> {
            (0..2)
                .map(|_| ThreadGroup::new(2).unwrap().into_iter().map(Some).collect())
                .collect()
        };
        let (mut inner, mut data) = (groups(), groups());
        for k in 0..4 {
            let (d, i, f, tx) = (k / 2, k % 2, f.clone(), tx.clone());
            let (ig, dg) = (inner[d][i].take().unwrap(), data[i][d].take().unwrap());
            std::thread::spawn(move || tx.send((k, f(d, i, &ig, &dg))).unwrap());
        }
    }
    let mut out: Vec<Option<T>> = (0..4).map(|_| None).collect();
    for _ in 0..4 {
        let (k, r) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a rank hangs or panicked: no result within 60 s");
        out[k] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn data_over_vocabulary_groups_over_nccl_is_the_thread_groups_result() {
    let Some(gpus) = gpus() else { return };
    if gpus < 4 {
        return;
    }
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::Bf16][seed as usize % 2],
            vocab: (6, 60),
            groups: (2, 3),
            group_size: 2,
            max_len: 8,
            ..BatchSpec::default()
        };
        let full = Arc::new(seeded_batch(seed, &spec));
        let (b, v) = (full.advantages.len(), full.vocab);
        let (b_cut, c_cut) = (b / 2 / 2 * 2, v / 3);
        let single = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
        let want = single.forward(&full.batch()).unwrap();
        let work = Arc::new(
            move |d: usize, i: usize, vg: &dyn Collective, dg: &dyn Collective| {
                let (b0, b1) = [(0, b_cut), (b_cut, b)][d];
                let (c0, c1) = [(0, c_cut), (c_cut, v)][i];
                let mine = common::part(&full, b0, b1, c0, c1);
                let at = VocabShard {
                    start: c0,
                    total: v,
                };
                let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(2 * d + i))?;
                let out = vppo.forward_vocab_data_parallel(&mine.batch(), at, vg, dg)?;
                let mut gr = vec![0.0f32; mine.targets.len() * mine.vocab];
                vppo.backward_vocab_parallel(&mine.batch(), at, &out, GradMut::F32(&mut gr))?;
                Ok::<_, VppoError>((out, gr))
            },
        );
        let case = format!("seed {seed}, responses cut at {b_cut}, columns at {c_cut}");
        let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
            v.into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                .collect()
        };
        let w = work.clone();
        let nccl = unwrap(on_grid(true, move |d, i, vg, dg| w(d, i, vg, dg)));
        let w = work.clone();
        let threads = unwrap(on_grid(false, move |d, i, vg, dg| w(d, i, vg, dg)));
        assert_eq!(text(&nccl), text(&threads), "{case}: NCCL vs threads");
        let loss: f64 = [0, 2].iter().map(|&k| nccl[k].0.loss).sum();
        assert!(
            close(loss, want.loss, 1e-5),
            "{case}: loss {loss} vs {}",
            want.loss
        );
        let mask: Vec<u8> = [0, 2]
            .iter()
            .flat_map(|&k| nccl[k].0.tokens.mask.clone())
            .collect();
        assert_eq!(mask, want.tokens.mask, "{case}: mask");
    }
}

/// Rank 0 of a group of two whose rank 1 failed returned GroupFailed (it did not wait on rank 1).
fn rank_0_heard_of_rank_1<T: std::fmt::Debug>(got: &[vppo::Result<T>]) {
    assert!(
        matches!(got[0], Err(VppoError::GroupFailed { rank: 0, failed: 1 })),
        "{:?}",
        got[0]
    );
}

#[test]
fn bad_input_on_one_nccl_rank_is_an_error_on_every_rank() {
    let Some(gpus) = gpus() else { return };
    if gpus < 2 {
        return;
    }
    let spec = BatchSpec {
        groups: (4, 4),
        group_size: 1,
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(3, &spec));
    let got = on_nccl_ranks(2, move |rank, g| {
        let mut mine = common::part(&full, rank, rank + 1, 0, full.vocab);
        if rank == 1 {
            mine.old_logp.push(f32::NAN); // one too many: a shape error
        }
        Vppo::new(VppoConfig::default(), Device::Cuda(rank))
            .unwrap()
            .forward_data_parallel(&mine.batch(), g)
            .map(|(o, _)| o)
    });
    assert!(
        matches!(got[1], Err(VppoError::Shape { .. })),
        "{:?}",
        got[1]
    );
    rank_0_heard_of_rank_1(&got);
}

#[test]
fn nccl_groups_that_cannot_be_built_are_clear_errors() {
    let Some(gpus) = gpus() else { return };
    let id = NcclId::new().unwrap();
    assert!(matches!(
        NcclGroup::new(0, 2, 2, &id),
        Err(VppoError::Config { .. })
    ));
    assert!(matches!(
        NcclGroup::new(0, 0, 0, &id),
        Err(VppoError::Config { .. })
    ));
    // the id round-trips through its bytes: a group of one built from them works
    let again = NcclId::from_bytes(id.to_bytes());
    let g = NcclGroup::new(0, 0, 1, &again).unwrap();
    assert_eq!(g.all_gather(&[2.5]).unwrap(), vec![2.5]);
    drop(g);
    if common::fake_nccl::active() && gpus >= 2 {
        // two ranks on one GPU: NCCL refuses, on both ranks, with its reason
        let id = NcclId::new().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for rank in 0..2 {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(NcclGroup::new(0, rank, 2, &id).map(|_| ())));
        }
        for _ in 0..2 {
            let r = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
            assert!(
                matches!(&r, Err(VppoError::Nccl(m)) if m.contains("ncclInvalidUsage")),
                "{r:?}"
            );
        }
    }
}

/// In the parent process (no fake library loaded, and no NCCL on a CI machine): building a group is
/// a clear error naming the library, not a panic.
#[test]
fn a_missing_nccl_library_is_a_clear_error() {
    if common::fake_nccl::active() || std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        return;
    }
    match NcclId::new() {
        Err(VppoError::NoNccl(m)) => assert!(m.contains("libnccl.so"), "{m}"),
        Ok(_) => eprintln!("skipped: this machine has an NCCL library"),
        Err(e) => panic!("expected NoNccl, got {e:?}"),
    }
}

/// The fake driver keeps its devices apart as a GPU does: a stream of device 1 used while device 0's
/// context is current is an invalid handle, and the same call under device 1's context works.
#[test]
fn the_fake_devices_keep_their_streams_apart() {
    if !common::fake_nccl::active() {
        return;
    }
    common::fake_nccl::install();
    use cudarc::driver::{result::memset_d8_async, sys::CUresult, CudaContext, DevicePtr};
    let (c0, c1) = (CudaContext::new(0).unwrap(), CudaContext::new(1).unwrap());
    let s1 = c1.new_stream().unwrap();
    let buf = s1.alloc_zeros::<u8>(16).unwrap();
    let (p, _done) = buf.device_ptr(&s1);
    c0.bind_to_thread().unwrap();
    // SAFETY: p is a live 16-byte allocation and s1 a live stream (the call is refused, or writes
    // zeros into the allocation).
    let wrong = unsafe { memset_d8_async(p, 0, 16, s1.cu_stream()) };
    assert_eq!(
        wrong.map_err(|e| e.0),
        Err(CUresult::CUDA_ERROR_INVALID_HANDLE)
    );
    c1.bind_to_thread().unwrap();
    // SAFETY: as above.
    unsafe { memset_d8_async(p, 0, 16, s1.cu_stream()) }.unwrap();
    s1.synchronize().unwrap();
}

// -------------------------------------------------------------------------------------------------
// The layouts on batches in GPU memory (DeviceBatch): the same bits as the host path on that GPU
// -------------------------------------------------------------------------------------------------

/// A host batch copied to GPU `ordinal`, ref_logp included, lent as a [`DeviceBatch`] (an empty
/// tensor as a borrowed view of 0 elements: CUDA has no buffers of 0 bytes, and the Python entry
/// point passes empty tensors so).
struct OnGpu {
    gpu: Arc<Gpu>,
    logits: DeviceOwned,
    logits_masked: DeviceOwned,
    targets: Slot<i32>,
    old_logp: Slot<f32>,
    advantages: Slot<f32>,
    cu_seqlens: Slot<i32>,
    ref_logp: Option<Slot<f32>>,
    ref_logits: Option<DeviceOwned>,
    vocab: usize,
}

/// A device copy, or a view of 0 elements.
enum Slot<T> {
    Owned(CudaSlice<T>),
    Empty(Borrowed<T>),
}

impl<T> std::ops::Deref for Slot<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        match self {
            Slot::Owned(x) => x,
            Slot::Empty(x) => x,
        }
    }
}

fn slot<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, x: &[T]) -> vppo::Result<Slot<T>> {
    if x.is_empty() {
        // SAFETY: a view of 0 elements reads no memory (any address).
        return Ok(Slot::Empty(unsafe { Borrowed::new(gpu, 0, 0) }));
    }
    Ok(Slot::Owned(gpu.upload(x)?))
}

enum DeviceOwned {
    F32(Slot<f32>),
    F16(Slot<half::f16>),
    Bf16(Slot<half::bf16>),
}

impl DeviceOwned {
    fn view(&self) -> DeviceLogits<'_> {
        match self {
            DeviceOwned::F32(x) => DeviceLogits::F32(x),
            DeviceOwned::F16(x) => DeviceLogits::F16(x),
            DeviceOwned::Bf16(x) => DeviceLogits::Bf16(x),
        }
    }
}

impl OnGpu {
    fn new(ordinal: usize, b: &OwnedBatch) -> vppo::Result<OnGpu> {
        let gpu = Gpu::new(ordinal)?;
        let up = |l: &vppo::OwnedLogits| -> vppo::Result<DeviceOwned> {
            Ok(match l {
                vppo::OwnedLogits::F32(x) => DeviceOwned::F32(slot(&gpu, x)?),
                vppo::OwnedLogits::F16(x) => DeviceOwned::F16(slot(&gpu, x)?),
                vppo::OwnedLogits::Bf16(x) => DeviceOwned::Bf16(slot(&gpu, x)?),
            })
        };
        Ok(OnGpu {
            logits: up(&b.logits)?,
            logits_masked: up(&b.logits_masked)?,
            targets: slot(&gpu, &b.targets)?,
            old_logp: slot(&gpu, &b.old_logp)?,
            advantages: slot(&gpu, &b.advantages)?,
            cu_seqlens: slot(&gpu, &b.cu_seqlens)?,
            ref_logp: b.ref_logp.as_ref().map(|r| slot(&gpu, r)).transpose()?,
            ref_logits: b.ref_logits.as_ref().map(up).transpose()?,
            vocab: b.vocab,
            gpu,
        })
    }

    fn batch(&self) -> DeviceBatch<'_> {
        DeviceBatch {
            logits: self.logits.view(),
            logits_masked: self.logits_masked.view(),
            targets: &self.targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu_seqlens,
            vocab: self.vocab,
            ref_logp: self.ref_logp.as_deref(),
            rows: None,
            masked_rows: None,
            ref_logits: self.ref_logits.as_ref().map(|r| r.view()),
        }
    }

    /// The f32 gradient of `fwd` on the GPU, copied back (empty without tokens).
    fn grad(&self, vppo: &Vppo, fwd: &vppo::DeviceForward) -> vppo::Result<Vec<f32>> {
        let len = self.targets.len() * self.vocab;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut g = self.gpu.alloc_zeros::<f32>(len)?;
        vppo.backward_device(fwd, &self.batch(), DeviceLogitsMut::F32(&mut g))?;
        self.gpu.download(&g)
    }
}

/// Data parallel on device memory (`Vppo::forward_device_data_parallel`, then the group config's
/// `backward_device`): the outputs and gradient of every rank are the host data-parallel path's
/// bits on the same GPUs, over thread groups and NCCL groups of 1, 2 and 4 ranks; also with
/// `kl_penalty = full` (ref_logits on the GPU, the penalty added again after pass 2's rerun).
#[test]
fn device_data_parallel_is_the_host_path_s_bits() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::Bf16, Dtype::F32][seed as usize % 2],
            groups: (4, 5),
            group_size: 2,
            max_len: 7,
            ..BatchSpec::default()
        };
        let mut batch = seeded_batch(seed + 10, &spec);
        // ref_logits: the logits shifted by a pattern (ignored by every penalty but full)
        let shifted: Vec<f32> = (batch.logits.to_f32().iter().enumerate())
            .map(|(i, &x)| x + ((i % 7) as f32 - 3.0) / 4.0)
            .collect();
        batch.ref_logits = Some(match batch.logits {
            vppo::OwnedLogits::F32(_) => vppo::OwnedLogits::F32(shifted),
            vppo::OwnedLogits::F16(_) => {
                vppo::OwnedLogits::F16(shifted.into_iter().map(half::f16::from_f32).collect())
            }
            vppo::OwnedLogits::Bf16(_) => {
                vppo::OwnedLogits::Bf16(shifted.into_iter().map(half::bf16::from_f32).collect())
            }
        });
        let full = with_ref_logp(batch);
        let b_count = full.advantages.len();
        let full_kl = VppoConfig {
            kl_penalty: vppo::KlPenalty::Full,
            kl_coef: 0.5,
            ..VppoConfig::default()
        };
        for cfg in configs().into_iter().chain([full_kl]) {
            for size in sizes(gpus) {
                // whole groups of 2 responses per rank, uneven, the last rank possibly empty
                let mut cut: Vec<usize> = (0..size).map(|r| (b_count / 2 * r / size) * 2).collect();
                cut.push(b_count);
                let case = format!("seed {seed}, {cfg:?}, {size} ranks {cut:?}");
                let (f, c, k) = (full.clone(), cut.clone(), cfg.clone());
                let host = on_thread_ranks(size, move |rank, g| {
                    let mine = common::part(&f, c[rank], c[rank + 1], 0, f.vocab);
                    let vppo = Vppo::new(k.clone(), Device::Cuda(rank))?;
                    let (out, global) = vppo.forward_data_parallel(&mine.batch(), g)?;
                    let gr = grad(&global, &mine.batch(), &out)?;
                    Ok::<_, VppoError>((out, gr))
                });
                let work = {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    Arc::new(move |rank: usize, g: &dyn Collective| {
                        let mine = common::part(&full, cut[rank], cut[rank + 1], 0, full.vocab);
                        let on = OnGpu::new(rank, &mine)?;
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        let (fwd, global) = vppo.forward_device_data_parallel(&on.batch(), g)?;
                        let gr = on.grad(&global, &fwd)?;
                        Ok::<_, VppoError>((fwd.output.clone(), gr))
                    })
                };
                let w = work.clone();
                let threads = on_thread_ranks(size, move |rank, g| w(rank, g));
                let w = work.clone();
                let nccl = on_nccl_ranks(size, move |rank, g| w(rank, g));
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (host, threads, nccl) = (unwrap(host), unwrap(threads), unwrap(nccl));
                assert_eq!(text(&threads), text(&host), "{case}: device vs host");
                assert_eq!(text(&nccl), text(&host), "{case}: device over NCCL vs host");
            }
        }
    }
}

/// Bad input on one rank of a device data-parallel group (a shape error found in the O(N + B)
/// checks, a NaN found by pass 1 on the GPU) is an error on every rank, not a hang.
#[test]
fn bad_device_input_on_one_rank_is_an_error_on_every_rank() {
    let Some(gpus) = gpus() else { return };
    if gpus < 2 {
        return;
    }
    let spec = BatchSpec {
        groups: (4, 4),
        group_size: 1,
        max_len: 9,
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(3, &spec));
    // two responses per rank, with tokens on rank 1 (for the NaN)
    assert!(
        full.cu_seqlens[4] > full.cu_seqlens[2],
        "{:?}",
        full.cu_seqlens
    );
    for spoil in 0..2 {
        let full = full.clone();
        let got = on_thread_ranks(2, move |rank, g| {
            let mut mine = common::part(&full, 2 * rank, 2 * rank + 2, 0, full.vocab);
            if rank == 1 {
                match spoil {
                    0 => mine.old_logp.push(0.0), // one too many: a shape error
                    _ => match &mut mine.logits {
                        vppo::OwnedLogits::F32(x) => x[0] = f32::NAN,
                        _ => unreachable!("f32 batch"),
                    },
                }
            }
            let on = OnGpu::new(rank, &mine)?;
            Vppo::new(VppoConfig::default(), Device::Cuda(rank))?
                .forward_device_data_parallel(&on.batch(), g)
                .map(|(f, _)| f.output)
        });
        match spoil {
            0 => assert!(
                matches!(got[1], Err(VppoError::Shape { .. })),
                "{:?}",
                got[1]
            ),
            _ => assert!(
                matches!(got[1], Err(VppoError::NonFinite { .. })),
                "{:?}",
                got[1]
            ),
        }
        rank_0_heard_of_rank_1(&got);
    }
}

impl OnGpu {
    /// The saved tensors of `out` (lse, dlogp) on the GPU, with the batch's targets.
    fn saved_grad(
        &self,
        out: &VppoOutput,
        backward: impl FnOnce(&vppo::DeviceSaved, DeviceLogitsMut) -> vppo::Result<()>,
    ) -> vppo::Result<Vec<f32>> {
        let len = self.targets.len() * self.vocab;
        if len == 0 {
            return Ok(Vec::new());
        }
        let (lse, dlogp) = (
            self.gpu.upload(&out.tokens.lse)?,
            self.gpu.upload(&out.tokens.dlogp)?,
        );
        let saved = vppo::DeviceSaved {
            targets: &self.targets,
            lse: &lse,
            dlogp: &dlogp,
            rows: None,
        };
        let mut g = self.gpu.upload(&vec![f32::NAN; len])?;
        backward(&saved, DeviceLogitsMut::F32(&mut g))?;
        self.gpu.download(&g)
    }
}

/// Vocabulary parallel on device memory (`forward_device_vocab_parallel`, then
/// `backward_saved_device_vocab_parallel`): every rank's outputs and gradient columns are the
/// host path's bits on the same GPUs; a NaN in one shard is an error on every rank.
#[test]
fn device_vocab_parallel_is_the_host_path_s_bits() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::F16, Dtype::F32][seed as usize % 2],
            vocab: (5, 200),
            groups: (1, 3),
            max_len: 8,
            ..BatchSpec::default()
        };
        let full = with_ref_logp(seeded_batch(seed + 20, &spec));
        let v = full.vocab;
        for cfg in configs() {
            for size in sizes(gpus).into_iter().filter(|&s| s <= v) {
                let mut cut: Vec<usize> = (0..size).map(|r| (v * r * r) / (size * size)).collect();
                for r in 1..size {
                    cut[r] = cut[r].max(cut[r - 1] + 1);
                }
                cut.push(v);
                let case = format!("seed {seed}, V {v}, {cfg:?}, {size} shards {cut:?}");
                let run = |on_device: bool| {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    on_thread_ranks(size, move |rank, g| {
                        let all = full.advantages.len();
                        let mine = common::part(&full, 0, all, cut[rank], cut[rank + 1]);
                        let at = VocabShard {
                            start: cut[rank],
                            total: full.vocab,
                        };
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        if !on_device {
                            let out = vppo.forward_vocab_parallel(&mine.batch(), at, g)?;
                            let mut gr = vec![0.0f32; mine.targets.len() * mine.vocab];
                            vppo.backward_vocab_parallel(
                                &mine.batch(),
                                at,
                                &out,
                                GradMut::F32(&mut gr),
                            )?;
                            return Ok::<_, VppoError>((out, gr));
                        }
                        let on = OnGpu::new(rank, &mine)?;
                        let out = vppo.forward_device_vocab_parallel(&on.batch(), at, g, None)?;
                        let gr = on.saved_grad(&out, |saved, grad| {
                            vppo.backward_saved_device_vocab_parallel(
                                on.logits.view(),
                                on.vocab,
                                at,
                                saved,
                                grad,
                            )
                        })?;
                        Ok((out, gr))
                    })
                };
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (host, device) = (unwrap(run(false)), unwrap(run(true)));
                assert_eq!(text(&device), text(&host), "{case}: device vs host");
            }
        }
    }
    // A NaN in rank 1's shard: its error, and GroupFailed on rank 0.
    let spec = BatchSpec {
        vocab: (20, 20),
        groups: (2, 2),
        max_len: 6,
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(5, &spec));
    assert!(!full.targets.is_empty());
    let got = on_thread_ranks(2, move |rank, g| {
        let mut mine = common::part(&full, 0, full.advantages.len(), 10 * rank, 10 * rank + 10);
        if rank == 1 {
            match &mut mine.logits_masked {
                vppo::OwnedLogits::F32(x) => x[3] = f32::INFINITY,
                _ => unreachable!("f32 batch"),
            }
        }
        let on = OnGpu::new(rank, &mine)?;
        let at = VocabShard {
            start: 10 * rank,
            total: 20,
        };
        Vppo::new(VppoConfig::default(), Device::Cuda(rank))?.forward_device_vocab_parallel(
            &on.batch(),
            at,
            g,
            None,
        )
    });
    assert!(
        matches!(
            got[1],
            Err(VppoError::NonFinite {
                tensor: vppo::Tensor::LogitsMasked,
                value,
                ..
            }) if value == f64::INFINITY
        ),
        "{:?}",
        got[1]
    );
    rank_0_heard_of_rank_1(&got);
}

/// Sequence parallel on device memory (`forward_device_sequence_parallel`, then
/// `backward_saved_device`): every rank's outputs and gradient rows are the host path's bits on the
/// same GPUs, responses split across ranks.
#[test]
fn device_sequence_parallel_is_the_host_path_s_bits() {
    let Some(gpus) = gpus() else { return };
    for seed in 0..2u64 {
        let spec = BatchSpec {
            dtype: [Dtype::Bf16, Dtype::F32][seed as usize % 2],
            groups: (2, 3),
            group_size: 2,
            max_len: 12,
            ..BatchSpec::default()
        };
        let full = with_ref_logp(seeded_batch(seed + 30, &spec));
        let n = full.targets.len();
        for cfg in configs() {
            for size in sizes(gpus).into_iter().filter(|&s| s <= n) {
                let cut: Vec<usize> = (0..=size).map(|r| n * r / size).collect();
                let case = format!("seed {seed}, {cfg:?}, {size} ranks, cuts {cut:?}");
                let run = |on_device: bool| {
                    let (full, cut, cfg) = (full.clone(), cut.clone(), cfg.clone());
                    on_thread_ranks(size, move |rank, g| {
                        let (mine, continues) = common::pieces(&full, cut[rank], cut[rank + 1]);
                        let vppo = Vppo::new(cfg.clone(), Device::Cuda(rank))?;
                        if !on_device {
                            let out =
                                vppo.forward_sequence_parallel(&mine.batch(), continues, g)?;
                            let mut gr = vec![0.0f32; mine.targets.len() * mine.vocab];
                            vppo.backward_sequence_parallel(
                                &mine.batch(),
                                &out,
                                GradMut::F32(&mut gr),
                            )?;
                            return Ok::<_, VppoError>((out, gr));
                        }
                        let on = OnGpu::new(rank, &mine)?;
                        let out =
                            vppo.forward_device_sequence_parallel(&on.batch(), continues, g, None)?;
                        let gr = on.saved_grad(&out, |saved, grad| {
                            vppo.backward_saved_device(
                                Some(on.logits.view()),
                                on.vocab,
                                saved,
                                grad,
                            )
                        })?;
                        Ok((out, gr))
                    })
                };
                let unwrap = |v: Vec<vppo::Result<(VppoOutput, Vec<f32>)>>| -> Vec<_> {
                    v.into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect()
                };
                let (host, device) = (unwrap(run(false)), unwrap(run(true)));
                assert_eq!(text(&device), text(&host), "{case}: device vs host");
            }
        }
    }
}
