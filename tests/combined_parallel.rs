//! The layouts of SPEC section 11 combined: data parallel over vocabulary groups, data parallel over
//! sequence groups, vocabulary groups inside sequence groups, and all three (src/parallel/), each
//! rank a thread holding one handle of each of its groups. Against the single process on the whole
//! batch: the sum over the data group of the losses, every token's dlogp, the mask and the
//! gradient; outputs bit-identical over each vocabulary group. Bad input on one rank is an error on
//! every rank of every group, with no hang.

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

/// The handles of a grid of ranks (d, s, v): data replica d of `nd`, sequence position s of `ns`,
/// vocabulary position v of `nv`. Runs `f(d, s, v, vocab, seq, data)` on a thread per rank, with
/// `vocab` the group of the ranks (d, s, *), `seq` that of (d, *, v) and `data` that of (*, s, v).
/// Results in (d, s, v) order; a hang fails the test.
type CubeFn<T> =
    dyn Fn(usize, usize, usize, &ThreadGroup, &ThreadGroup, &ThreadGroup) -> T + Send + Sync;

fn on_cube<T: Send + 'static>(dims: (usize, usize, usize), f: Arc<CubeFn<T>>) -> Vec<T> {
    let (nd, ns, nv) = dims;
    let at = move |d: usize, s: usize, v: usize| (d * ns + s) * nv + v;
    let groups = |count: usize, size: usize| -> Vec<Vec<Option<ThreadGroup>>> {
        (0..count)
            .map(|_| {
                ThreadGroup::new(size)
                    .unwrap()
                    .into_iter()
                    .map(Some)
                    .collect()
            })
            .collect()
    };
    // vocabulary groups by (d, s), sequence groups by (d, v), data groups by (s, v)
    let (mut vocab, mut seq, mut data) = (
        groups(nd * ns, nv),
        groups(nd * nv, ns),
        groups(ns * nv, nd),
    );
    let (tx, rx) = mpsc::channel();
    for d in 0..nd {
        for s in 0..ns {
            for v in 0..nv {
                let vg = vocab[d * ns + s][v].take().unwrap();
                let sg = seq[d * nv + v][s].take().unwrap();
                let dg = data[s * nv + v][d].take().unwrap();
                let (f, tx) = (f.clone(), tx.clone());
                std::thread::spawn(move || {
                    let r = f(d, s, v, &vg, &sg, &dg);
                    tx.send((at(d, s, v), r)).unwrap();
                });
            }
        }
    }
    let total = nd * ns * nv;
    let mut out: Vec<Option<T>> = (0..total).map(|_| None).collect();
    for _ in 0..total {
        let (k, r) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a rank hangs: no result within 60 s");
        out[k] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Where a batch's tokens are cut between two sequence ranks: in the middle of its longest
/// response (so that a response is split), or at the middle token when none has two tokens.
fn token_cut(cu: &[i32]) -> usize {
    let (s, e) = cu
        .windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
        .max_by_key(|(s, e)| e - s)
        .unwrap_or((0, 0));
    if e - s >= 2 {
        s + (e - s) / 2
    } else {
        *cu.last().unwrap() as usize / 2
    }
}

/// What a rank of [`vocab_over_sequence`] returns: its output, its gradient (its rows, its
/// columns), and where they lie: its first token and first column in the whole batch.
type RankResult = Result<(VppoOutput, Vec<f32>, usize, usize), VppoError>;

/// Every rank of an `nd` x 2 x 2 grid (data x sequence x vocabulary) on batch `full`: replica d holds
/// its share of the groups of G responses, cut at [`token_cut`] between its sequence ranks, columns
/// cut at `c_cut`. With `nd` = 1 there is no data group. `spoil(d, s, v, batch,
/// continues)` may make a rank's input bad.
fn vocab_over_sequence(
    full: Arc<OwnedBatch>,
    nd: usize,
    c_cut: usize,
    device: Device,
    cfg: VppoConfig,
    spoil: fn(usize, usize, usize, &mut OwnedBatch, &mut bool),
) -> Vec<RankResult> {
    let f = move |d: usize,
                  s: usize,
                  v: usize,
                  vg: &ThreadGroup,
                  sg: &ThreadGroup,
                  dg: &ThreadGroup| {
        let (b, vocab) = (full.advantages.len(), full.vocab);
        // whole groups of G responses on each replica (group-scope shaping needs them)
        let (g, groups) = (cfg.group_size, b / cfg.group_size);
        let (b0, b1) = (g * (d * groups / nd), g * ((d + 1) * groups / nd));
        let (c0, c1) = [(0, c_cut), (c_cut, vocab)][v];
        let whole = common::part(&full, b0, b1, c0, c1);
        let cut = token_cut(&whole.cu_seqlens);
        let (t0, t1) = [(0, cut), (cut, whole.targets.len())][s];
        let (mut mine, mut continues) = common::pieces(&whole, t0, t1);
        spoil(d, s, v, &mut mine, &mut continues);
        let at = VocabShard {
            start: c0,
            total: vocab,
        };
        let vppo = Vppo::new(cfg.clone(), device).unwrap();
        let data = (nd > 1).then_some(dg as &dyn vppo::Collective);
        let out =
            vppo.forward_vocab_sequence_parallel(&mine.batch(), at, continues, vg, sg, data)?;
        let mut grad = vec![0.0f32; mine.targets.len() * mine.vocab];
        vppo.backward_vocab_parallel(&mine.batch(), at, &out, GradMut::F32(&mut grad))?;
        Ok((out, grad, full.cu_seqlens[b0] as usize + t0, c0))
    };
    on_cube((nd, 2, 2), Arc::new(f))
}

fn unspoiled(_: usize, _: usize, _: usize, _: &mut OwnedBatch, _: &mut bool) {}

#[test]
fn vocabulary_shards_of_sequence_pieces_are_the_single_process() {
    let configs = [
        VppoConfig::default(),
        VppoConfig {
            aggregation: vppo::Aggregation::SeqMeanTokenMean,
            shaping: vppo::Shaping::Linear,
            group_size: 2,
            ..VppoConfig::default()
        },
    ];
    for seed in 0..4u64 {
        for device in [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)] {
            for (c, cfg) in configs.iter().enumerate() {
                let nd = 1 + (seed as usize + c) % 2;
                let (full, _, c_cut) = batch_and_cuts(seed);
                let v = full.vocab;
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let want = vppo.forward(&full.batch()).unwrap();
                let mut want_grad = vec![0.0f32; full.targets.len() * v];
                vppo.backward_into(&full.batch(), &want, GradMut::F32(&mut want_grad))
                    .unwrap();
                let got =
                    vocab_over_sequence(full.clone(), nd, c_cut, device, cfg.clone(), unspoiled);
                let case = format!(
                    "seed {seed}, {device:?}, {cfg:?}, {nd} data x 2 sequence x 2 vocabulary ranks, \
                     columns cut at {c_cut}"
                );
                let got: Vec<(VppoOutput, Vec<f32>, usize, usize)> = got
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                    .collect();
                // bit-identical over each vocabulary group (Debug shows every f32 exactly, -0 too)
                for pair in got.chunks(2) {
                    assert_eq!(
                        format!("{:?}", pair[0].0),
                        format!("{:?}", pair[1].0),
                        "{case}: the two shards of one piece"
                    );
                }
                // each replica's loss on its four ranks alike; the sum over replicas is the whole
                let mut loss = 0.0;
                for replica in got.chunks(4) {
                    assert!(replica
                        .iter()
                        .all(|r| r.0.loss.to_bits() == replica[0].0.loss.to_bits()));
                    loss += replica[0].0.loss;
                }
                assert!(
                    close(loss, want.loss, 1e-5),
                    "{case}: loss {loss} vs {}",
                    want.loss
                );
                // vocabulary rank 0 of each piece, in token order
                let first: Vec<&VppoOutput> = got.iter().step_by(2).map(|r| &r.0).collect();
                let mask: Vec<u8> = first.iter().flat_map(|o| o.tokens.mask.clone()).collect();
                assert_eq!(mask, want.tokens.mask, "{case}: mask");
                let dlogp: Vec<f32> = first.iter().flat_map(|o| o.tokens.dlogp.clone()).collect();
                let lse: Vec<f32> = first.iter().flat_map(|o| o.tokens.lse.clone()).collect();
                for t in 0..dlogp.len() {
                    for (name, a, w) in [
                        ("dlogp", dlogp[t], want.tokens.dlogp[t]),
                        ("lse", lse[t], want.tokens.lse[t]),
                    ] {
                        assert!(
                            close(a as f64, w as f64, 1e-5),
                            "{case}: {name} {t}: {a} vs {w}"
                        );
                    }
                }
                for (k, (out, grad, t0, c0)) in got.iter().enumerate() {
                    let w = [c_cut, v - c_cut][k % 2];
                    assert_eq!(grad.len(), out.tokens.mask.len() * w, "{case}");
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
}

#[test]
fn bad_input_on_one_rank_of_the_cube_is_an_error_on_every_rank() {
    let (full, _, c_cut) = batch_and_cuts(5);
    // a NaN in the shard of rank (1, 1, 1): its error, GroupFailed on the 7 others
    fn nan(d: usize, s: usize, v: usize, b: &mut OwnedBatch, _: &mut bool) {
        if (d, s, v) == (1, 1, 1) {
            match &mut b.logits_masked {
                OwnedLogits::F32(x) => x[0] = f32::NAN,
                OwnedLogits::F16(x) => x[0] = half::f16::NAN,
                OwnedLogits::Bf16(x) => x[0] = half::bf16::NAN,
            }
        }
    }
    let got = vocab_over_sequence(
        full.clone(),
        2,
        c_cut,
        Device::Reference,
        VppoConfig::default(),
        nan,
    );
    for (k, r) in got.iter().enumerate() {
        let ok = match k {
            7 => matches!(r, Err(VppoError::NonFinite { .. })),
            _ => matches!(r, Err(VppoError::GroupFailed { .. })),
        };
        assert!(ok, "nan: rank {k}: {:?}", r.as_ref().map(|_| ()));
    }
    // sequence rank 0 of replica 0 says it continues a response (both its shards): a layout error
    // its sequence groups find alike after their round 1, then GroupFailed on replica 1
    fn first_continues(d: usize, s: usize, _: usize, _: &mut OwnedBatch, c: &mut bool) {
        if (d, s) == (0, 0) {
            *c = true;
        }
    }
    let got = vocab_over_sequence(
        full,
        2,
        c_cut,
        Device::Reference,
        VppoConfig::default(),
        first_continues,
    );
    for (k, r) in got.iter().enumerate() {
        let ok = match k {
            0..=3 => matches!(r, Err(VppoError::Shape { .. })),
            _ => matches!(r, Err(VppoError::GroupFailed { .. })),
        };
        assert!(ok, "continues: rank {k}: {:?}", r.as_ref().map(|_| ()));
    }
}
