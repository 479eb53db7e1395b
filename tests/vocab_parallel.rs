//! Vocabulary parallel (SPEC section 11, src/parallel/vocab.rs): both logits tensors of a batch
//! split by columns over 1 to 4 ranks (threads of a `ThreadGroup`, uneven shards, a shard of one
//! column), each rank calling `Vppo::forward_vocab_parallel` on its columns, against the unsharded
//! forward on the same device: every rank's outputs bit-identical to the others', the per-token
//! values, mask, alpha and loss equal to the unsharded ones to rounding, and the ranks' gradient
//! columns together equal to the unsharded gradient. Bad input on one shard, and shards that do not
//! tile [0, V), are errors on every rank, with no hang.

mod common;

use std::sync::Arc;

use common::{seeded_batch, BatchSpec};
use vppo::{
    Aggregation, Device, Dtype, GradMut, OwnedLogits, Perception, VocabShard, Vppo, VppoConfig,
    VppoError, VppoOutput,
};

/// Shard boundaries over V columns for `size` ranks: uneven, each at least one column wide.
fn shards(v: usize, size: usize) -> Vec<usize> {
    let mut cuts = vec![0];
    for r in 1..size {
        // rank r - 1 gets about v / size columns, skewed, at least 1
        let want = (v * r * r) / (size * size);
        cuts.push(want.max(cuts[r - 1] + 1).min(v - (size - r)));
    }
    cuts.push(v);
    cuts
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    if got == want {
        return true; // also +inf = +inf
    }
    (got - want).abs() <= tol * want.abs().max(1.0)
}

fn same_bits(a: &VppoOutput, b: &VppoOutput) -> bool {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    a.loss.to_bits() == b.loss.to_bits()
        && bits(&a.tokens.score) == bits(&b.tokens.score)
        && bits(&a.tokens.lse) == bits(&b.tokens.lse)
        && bits(&a.tokens.dlogp) == bits(&b.tokens.dlogp)
        && a.tokens.mask == b.tokens.mask
        && bits(&a.responses.alpha) == bits(&b.responses.alpha)
}

#[test]
fn the_shards_together_are_the_unsharded_loss() {
    let mut devices = vec![Device::Reference];
    devices.extend(common::devices());
    let configs = [
        VppoConfig::default(),
        VppoConfig {
            perception: Perception::K3,
            aggregation: Aggregation::SeqMeanTokenMean,
            temperature: 0.8,
            ..VppoConfig::default()
        },
        // SPEC 12: the KL penalty from ref_logp (the same [N] on every rank)
        VppoConfig {
            kl_penalty: vppo::KlPenalty::K3,
            kl_coef: 0.5,
            ..VppoConfig::default()
        },
    ];
    let seeds = if std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        2
    } else {
        6
    };
    for seed in 0..seeds {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::Bf16, Dtype::F16][seed as usize % 3],
            vocab: (5, 300),
            groups: (1, 3),
            max_len: 8,
            ..BatchSpec::default()
        };
        let mut full = seeded_batch(seed, &spec);
        full.ref_logp = Some(
            full.old_logp
                .iter()
                .enumerate()
                .map(|(t, &x)| x + (t as f32 * 0.9).cos())
                .collect(),
        );
        let full = Arc::new(full);
        let v = full.vocab;
        for cfg in &configs {
            for &device in &devices {
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let want = vppo.forward(&full.batch()).unwrap();
                let mut want_grad = vec![0.0f32; full.targets.len() * v];
                vppo.backward_into(&full.batch(), &want, GradMut::F32(&mut want_grad))
                    .unwrap();
                for size in [1, 2, 3, 4].into_iter().filter(|&s| s <= v) {
                    let cut = shards(v, size);
                    let (full2, cut2, cfg2) = (full.clone(), cut.clone(), cfg.clone());
                    let got = common::on_ranks(size, move |rank, g| {
                        let mine = common::part(
                            &full2,
                            0,
                            full2.advantages.len(),
                            cut2[rank],
                            cut2[rank + 1],
                        );
                        let at = VocabShard {
                            start: cut2[rank],
                            total: full2.vocab,
                        };
                        let vppo = Vppo::new(cfg2.clone(), device).unwrap();
                        let out = vppo.forward_vocab_parallel(&mine.batch(), at, g)?;
                        let mut grad = vec![0.0f32; mine.targets.len() * mine.vocab];
                        vppo.backward_vocab_parallel(
                            &mine.batch(),
                            at,
                            &out,
                            GradMut::F32(&mut grad),
                        )?;
                        Ok::<_, VppoError>((out, grad))
                    });
                    let case = format!("seed {seed}, V {v}, {cfg:?}, {device:?}, shards {cut:?}");
                    let got: Vec<(VppoOutput, Vec<f32>)> = got
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect();
                    for (o, _) in &got[1..] {
                        assert!(same_bits(o, &got[0].0), "{case}: ranks differ");
                    }
                    let o = &got[0].0;
                    assert!(
                        close(o.loss, want.loss, 1e-5),
                        "{case}: loss {} vs {}",
                        o.loss,
                        want.loss
                    );
                    assert!(
                        close(o.kl_loss, want.kl_loss, 1e-5),
                        "{case}: kl_loss {} vs {}",
                        o.kl_loss,
                        want.kl_loss
                    );
                    assert_eq!(o.tokens.mask, want.tokens.mask, "{case}: mask");
                    let t = &want.tokens;
                    for (name, g, w) in [
                        ("lse", &o.tokens.lse, &t.lse),
                        ("logp", &o.tokens.logp, &t.logp),
                        ("logp_masked", &o.tokens.logp_masked, &t.logp_masked),
                        ("kl", &o.tokens.kl, &t.kl),
                        ("entropy", &o.tokens.entropy, &t.entropy),
                        ("score", &o.tokens.score, &t.score),
                        ("dlogp", &o.tokens.dlogp, &t.dlogp),
                        ("alpha", &o.responses.alpha, &want.responses.alpha),
                    ] {
                        for (i, (&a, &b)) in g.iter().zip(w.iter()).enumerate() {
                            assert!(
                                close(a as f64, b as f64, 2e-5),
                                "{case}: {name} {i}: {a} vs {b}"
                            );
                        }
                    }
                    // the ranks' columns, side by side, are the unsharded gradient's
                    for (row, wrow) in want_grad.chunks(v).enumerate() {
                        for (r, (_, grad)) in got.iter().enumerate() {
                            let w = cut[r + 1] - cut[r];
                            for (j, &gv) in grad[row * w..(row + 1) * w].iter().enumerate() {
                                let wv = wrow[cut[r] + j];
                                assert!(
                                    close(gv as f64, wv as f64, 2e-5),
                                    "{case}: grad [{row}, {}]: {gv} vs {wv}",
                                    cut[r] + j
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every test of this file again on `Device::Cuda(0)` through the fake CUDA driver.
#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

#[test]
fn bad_input_in_one_shard_is_an_error_on_every_rank() {
    let spec = BatchSpec {
        vocab: (40, 40),
        groups: (2, 2),
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(11, &spec));
    for device in [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)] {
        let full2 = full.clone();
        let got = common::on_ranks(3, move |rank, g| {
            let cut = [0, 10, 25, 40];
            let mut mine =
                common::part(&full2, 0, full2.advantages.len(), cut[rank], cut[rank + 1]);
            if rank == 2 {
                if let OwnedLogits::F32(x) = &mut mine.logits_masked {
                    x[3] = f32::NAN; // row 0
                }
            }
            let at = VocabShard {
                start: cut[rank],
                total: 40,
            };
            Vppo::new(VppoConfig::default(), device)
                .unwrap()
                .forward_vocab_parallel(&mine.batch(), at, g)
        });
        for (rank, r) in got.iter().enumerate() {
            match (rank, r) {
                (2, Err(VppoError::NonFinite { .. })) => {}
                (_, Err(VppoError::GroupFailed { failed: 1, .. })) if rank != 2 => {}
                _ => panic!("{device:?} rank {rank}: {r:?}"),
            }
        }
    }
}

#[test]
fn shards_that_do_not_tile_the_vocabulary_are_an_error_on_every_rank() {
    // A first column past i64 (or a vocabulary past int32): an error, never an overflow panic.
    let spec = BatchSpec {
        vocab: (7, 7),
        ..BatchSpec::default()
    };
    let one = seeded_batch(5, &spec);
    for at in [
        VocabShard {
            start: 1 << 63,
            total: (1 << 63) + 7,
        },
        VocabShard {
            start: usize::MAX - 6,
            total: usize::MAX,
        },
    ] {
        let g = vppo::ThreadGroup::new(1).unwrap().pop().unwrap();
        let r = Vppo::new(VppoConfig::default(), Device::Reference)
            .unwrap()
            .forward_vocab_parallel(&one.batch(), at, &g);
        assert!(r.is_err(), "{at:?}: {r:?}");
    }

    let spec = BatchSpec {
        vocab: (30, 30),
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(4, &spec));
    // shards that tile, but rank 1's old_logp (or advantages) are not rank 0's: pass 2 would run
    // on two batches, so every rank refuses
    for spoil in [0, 1] {
        let full2 = full.clone();
        let got = common::on_ranks(2, move |rank, g| {
            let (start, end) = [(0, 13), (13, 30)][rank];
            let mut mine = common::part(&full2, 0, full2.advantages.len(), start, end);
            if rank == 1 && spoil == 0 {
                mine.old_logp[0] += 0.5;
            }
            if rank == 1 && spoil == 1 {
                mine.advantages[0] = -mine.advantages[0] - 1.0;
            }
            let at = VocabShard { start, total: 30 };
            Vppo::new(VppoConfig::default(), Device::Reference)
                .unwrap()
                .forward_vocab_parallel(&mine.batch(), at, g)
        });
        for r in &got {
            assert!(
                matches!(r, Err(VppoError::Shape { detail, .. }) if detail.contains("hold different tokens") && detail.contains("rank 1")),
                "{spoil}: {r:?}"
            );
        }
    }
    // a gap (rank 1 starts at 12 where rank 0 ends at 10), then a last shard short of V
    for shards in [[(0, 10), (12, 20), (20, 30)], [(0, 10), (10, 20), (20, 28)]] {
        let full2 = full.clone();
        let got = common::on_ranks(3, move |rank, g| {
            let (start, end) = shards[rank];
            let mine = common::part(&full2, 0, full2.advantages.len(), start, end);
            let at = VocabShard { start, total: 30 };
            Vppo::new(VppoConfig::default(), Device::Reference)
                .unwrap()
                .forward_vocab_parallel(&mine.batch(), at, g)
        });
        let cut = shards;
        for r in &got {
            assert!(
                matches!(r, Err(VppoError::Shape { detail, .. }) if detail.contains("tile") || detail.contains("cover")),
                "{cut:?}: {r:?}"
            );
        }
    }
}
