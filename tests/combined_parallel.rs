//! The layouts of SPEC section 11 combined: data parallel over vocabulary groups, and data parallel
//! over sequence groups (src/parallel/), each rank a thread holding one handle of its vocabulary or
//! sequence group and one of its data group. Against the single process on the whole batch: the sum
//! over the data group of the losses, every token's dlogp, the mask and the gradient. Bad input on
//! one rank is an error on every rank of both groups, with no hang.

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{seeded_batch, BatchSpec};
use vppo::{
    Device, Dtype, GradMut, OwnedBatch, OwnedLogits, ThreadGroup, VocabShard, Vppo, VppoConfig,
    VppoError, VppoOutput,
};

/// Runs `f(d, i, inner, data)` for a 2 x 2 grid: data rank d, inner rank i (vocabulary or
/// sequence), `inner` the handle of data replica d's inner group, `data` the handle of the data
/// group of inner position i. Results in (d, i) order; a hang fails the test.
fn on_grid<T: Send + 'static>(
    f: impl Fn(usize, usize, &ThreadGroup, &ThreadGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let mut inner: Vec<Vec<Option<ThreadGroup>>> = (0..2)
        .map(|_| ThreadGroup::new(2).unwrap().into_iter().map(Some).collect())
        .collect();
    let mut data: Vec<Vec<Option<ThreadGroup>>> = (0..2)
        .map(|_| ThreadGroup::new(2).unwrap().into_iter().map(Some).collect())
        .collect();
    let (tx, rx) = mpsc::channel();
    for d in 0..2 {
        for i in 0..2 {
            let (ig, dg) = (inner[d][i].take().unwrap(), data[i][d].take().unwrap());
            let (f, tx) = (f.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = f(d, i, &ig, &dg);
                tx.send((d * 2 + i, r)).unwrap();
            });
        }
    }
    let mut out: Vec<Option<T>> = (0..4).map(|_| None).collect();
    for _ in 0..4 {
        let (k, r) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a rank hangs: no result within 60 s");
        out[k] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    got == want || (got - want).abs() <= tol * want.abs().max(1.0)
}

fn batch_and_cuts(seed: u64) -> (Arc<OwnedBatch>, usize, usize) {
    let spec = BatchSpec {
        dtype: [Dtype::F32, Dtype::Bf16][seed as usize % 2],
        vocab: (6, 60),
        groups: (2, 3),
        group_size: 2,
        max_len: 8,
        ..BatchSpec::default()
    };
    let full = seeded_batch(seed, &spec);
    let (b, v) = (full.advantages.len(), full.vocab);
    (Arc::new(full), b / 2, v / 3)
}

#[test]
fn data_over_vocabulary_groups_is_the_single_process() {
    for seed in 0..4u64 {
        for device in [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)] {
            let (full, b_cut, c_cut) = batch_and_cuts(seed);
            let (b, v) = (full.advantages.len(), full.vocab);
            let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
            let want = vppo.forward(&full.batch()).unwrap();
            let mut want_grad = vec![0.0f32; full.targets.len() * v];
            vppo.backward_into(&full.batch(), &want, GradMut::F32(&mut want_grad))
                .unwrap();
            let full2 = full.clone();
            let got = on_grid(move |d, i, vg, dg| {
                let (b0, b1) = [(0, b_cut), (b_cut, b)][d];
                let (c0, c1) = [(0, c_cut), (c_cut, v)][i];
                let mine = common::part(&full2, b0, b1, c0, c1);
                let at = VocabShard {
                    start: c0,
                    total: v,
                };
                let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
                let out = vppo.forward_vocab_data_parallel(&mine.batch(), at, vg, dg)?;
                let mut grad = vec![0.0f32; mine.targets.len() * mine.vocab];
                vppo.backward_vocab_parallel(&mine.batch(), at, &out, GradMut::F32(&mut grad))?;
                Ok::<_, VppoError>((out, grad))
            });
            let case =
                format!("seed {seed}, {device:?}, responses cut at {b_cut}, columns at {c_cut}");
            let got: Vec<(VppoOutput, Vec<f32>)> = got
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                .collect();
            // inner rank 0 of each data replica: its loss, mask and dlogp
            let loss: f64 = [0, 2].iter().map(|&k| got[k].0.loss).sum();
            assert!(
                close(loss, want.loss, 1e-5),
                "{case}: loss {loss} vs {}",
                want.loss
            );
            let mask: Vec<u8> = [0, 2]
                .iter()
                .flat_map(|&k| got[k].0.tokens.mask.clone())
                .collect();
            assert_eq!(mask, want.tokens.mask, "{case}: mask");
            let dlogp: Vec<f32> = [0, 2]
                .iter()
                .flat_map(|&k| got[k].0.tokens.dlogp.clone())
                .collect();
            for (t, (&a, &w)) in dlogp.iter().zip(&want.tokens.dlogp).enumerate() {
                assert!(
                    close(a as f64, w as f64, 1e-5),
                    "{case}: dlogp {t}: {a} vs {w}"
                );
            }
            // the gradient: data replica d's rows, vocabulary rank i's columns
            let t_cut = full.cu_seqlens[b_cut] as usize;
            for (k, (_, grad)) in got.iter().enumerate() {
                let (d, i) = (k / 2, k % 2);
                let (t0, c0, w) = ([0, t_cut][d], [0, c_cut][i], [c_cut, v - c_cut][i]);
                for (j, &g) in grad.iter().enumerate() {
                    let (row, col) = (t0 + j / w, c0 + j % w);
                    let wv = want_grad[row * v + col];
                    assert!(
                        close(g as f64, wv as f64, 1e-5),
                        "{case}: grad [{row}, {col}]: {g} vs {wv}"
                    );
                }
            }
        }
    }
}

#[test]
fn data_over_sequence_groups_is_the_single_process() {
    for seed in 0..4u64 {
        for device in [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)] {
            let (full, b_cut, _) = batch_and_cuts(seed);
            let b = full.advantages.len();
            let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
            let want = vppo.forward(&full.batch()).unwrap();
            let full2 = full.clone();
            let got = on_grid(move |d, i, sg, dg| {
                // data replica d holds responses [b0, b1); its sequence ranks split them mid-way
                let (b0, b1) = [(0, b_cut), (b_cut, b)][d];
                let whole = common::part(&full2, b0, b1, 0, full2.vocab);
                let n = whole.targets.len();
                let cut = n / 2;
                let (t0, t1) = [(0, cut), (cut, n)][i];
                let (mine, continues) = common::pieces(&whole, t0, t1);
                // the rows read in place out of the replica's tensors (SPEC section 10)
                let rows: Vec<i64> = (t0 as i64..t1 as i64).collect();
                let batch = vppo::Batch {
                    logits: whole.logits.view(),
                    logits_masked: whole.logits_masked.view(),
                    rows: Some(&rows),
                    masked_rows: Some(&rows),
                    ..mine.batch()
                };
                let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
                vppo.forward_sequence_data_parallel(&batch, continues, sg, dg)
            });
            let case = format!("seed {seed}, {device:?}, responses cut at {b_cut}");
            let got: Vec<VppoOutput> = got
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                .collect();
            // each sequence group returns its batch's loss: the sum over the data group is the whole
            let loss = got[0].loss + got[2].loss;
            assert!(
                close(loss, want.loss, 1e-5),
                "{case}: loss {loss} vs {}",
                want.loss
            );
            let mask: Vec<u8> = got.iter().flat_map(|o| o.tokens.mask.clone()).collect();
            assert_eq!(mask, want.tokens.mask, "{case}: mask");
            let dlogp: Vec<f32> = got.iter().flat_map(|o| o.tokens.dlogp.clone()).collect();
            for (t, (&a, &w)) in dlogp.iter().zip(&want.tokens.dlogp).enumerate() {
                assert!(
                    close(a as f64, w as f64, 1e-5),
                    "{case}: dlogp {t}: {a} vs {w}"
                );
            }
        }
    }
}

#[test]
fn bad_input_on_one_rank_is_an_error_on_every_rank_of_both_groups() {
    let (full, b_cut, c_cut) = batch_and_cuts(7);
    let (b, v) = (full.advantages.len(), full.vocab);
    let got = on_grid(move |d, i, vg, dg| {
        let (b0, b1) = [(0, b_cut), (b_cut, b)][d];
        let (c0, c1) = [(0, c_cut), (c_cut, v)][i];
        let mut mine = common::part(&full, b0, b1, c0, c1);
        if (d, i) == (1, 1) {
            match &mut mine.logits {
                OwnedLogits::F32(x) => x[0] = f32::NAN,
                OwnedLogits::F16(x) => x[0] = half::f16::NAN,
                OwnedLogits::Bf16(x) => x[0] = half::bf16::NAN,
            }
        }
        let at = VocabShard {
            start: c0,
            total: v,
        };
        Vppo::new(VppoConfig::default(), Device::Reference)
            .unwrap()
            .forward_vocab_data_parallel(&mine.batch(), at, vg, dg)
    });
    for (k, r) in got.iter().enumerate() {
        let ok = match k {
            3 => matches!(r, Err(VppoError::NonFinite { .. })),
            _ => matches!(r, Err(VppoError::GroupFailed { .. })),
        };
        assert!(ok, "rank (d {}, i {}): {r:?}", k / 2, k % 2);
    }
}
