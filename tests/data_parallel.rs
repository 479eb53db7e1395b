//! Data parallel (SPEC section 11, src/parallel.rs): a batch split by whole responses over 1 to 4
//! ranks (threads of a `ThreadGroup`), each rank calling `Vppo::forward_data_parallel` on its piece,
//! against the single-process forward of the whole batch on the same device: the sum of the
//! per-rank losses, every token's dlogp, mask and gradient row, and every response's alpha.
//! Bad input on one rank and ranks with different configs are errors on every rank, with no hang.

mod common;

use common::{seeded_batch, BatchSpec};
use vppo::{
    Aggregation, Batch, Collective, Device, Dtype, GradMut, Perception, ReduceOp, Shaping,
    TasScope, ThreadGroup, Vppo, VppoConfig, VppoError, VppoOutput,
};

/// Split points over B responses for `size` ranks at group boundaries (uneven, some ranks empty).
fn splits(b_count: usize, group: usize, size: usize, seed: u64) -> Vec<usize> {
    let groups = b_count / group;
    let mut cuts: Vec<usize> = (1..size)
        .map(|r| ((seed as usize * 7 + r * 5) % (groups + 1)) * group)
        .collect();
    cuts.sort();
    let mut s = vec![0];
    s.extend(cuts);
    s.push(b_count);
    s
}

fn configs() -> Vec<(&'static str, VppoConfig)> {
    let d = VppoConfig::default;
    vec![
        ("default (mean-preserving, batch, token-mean)", d()),
        (
            "k3, linear over the batch",
            VppoConfig {
                perception: Perception::K3,
                shaping: Shaping::Linear,
                tas_scope: Some(TasScope::Batch),
                ..d()
            },
        ),
        (
            "linear per group (each group on one rank)",
            VppoConfig {
                shaping: Shaping::Linear,
                group_size: 2,
                ..d()
            },
        ),
        (
            "seq-mean-token-mean",
            VppoConfig {
                aggregation: Aggregation::SeqMeanTokenMean,
                ..d()
            },
        ),
        (
            "seq-mean-token-sum, no shaping",
            VppoConfig {
                aggregation: Aggregation::SeqMeanTokenSum,
                shaping: Shaping::None,
                ..d()
            },
        ),
        (
            "mean-preserving with a caller range",
            VppoConfig {
                tas_range: Some((0.05, 0.4)),
                ..d()
            },
        ),
        (
            "KL penalty k3 (SPEC 12)",
            VppoConfig {
                kl_penalty: vppo::KlPenalty::K3,
                kl_coef: 0.5,
                ..d()
            },
        ),
        (
            "KL penalty mse, seq-mean-token-mean",
            VppoConfig {
                kl_penalty: vppo::KlPenalty::Mse,
                kl_coef: 0.2,
                aggregation: Aggregation::SeqMeanTokenMean,
                ..d()
            },
        ),
    ]
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

fn grad(vppo: &Vppo, batch: &Batch, out: &VppoOutput) -> Vec<f32> {
    let mut g = vec![0.0f32; batch.targets.len() * batch.vocab];
    vppo.backward_into(batch, out, GradMut::F32(&mut g))
        .unwrap();
    g
}

/// Every test of this file again on `Device::Cuda(0)` through the fake CUDA driver (ranks as threads
/// sharing one device), in both lane orders: the GPU host path of the rerun pass 2 runs in CI.
#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

#[test]
fn the_sum_over_ranks_is_the_single_process_loss() {
    let mut devices = vec![Device::Reference];
    devices.extend(common::devices());
    // fewer seeds through the fake driver (its reruns: below), whose launches are slower
    let seeds = if std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        3
    } else {
        6
    };
    let mut checked = 0;
    for seed in 0..seeds {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::Bf16, Dtype::F16][seed as usize % 3],
            groups: (2, 5),
            group_size: 2,
            max_len: 9,
            ..BatchSpec::default()
        };
        let mut full = seeded_batch(seed, &spec);
        // a reference policy's log-probs for the KL configs (ignored by the others)
        full.ref_logp = Some(
            full.old_logp
                .iter()
                .enumerate()
                .map(|(t, &x)| x + (t as f32 * 0.7).sin())
                .collect(),
        );
        let full = std::sync::Arc::new(full);
        let b_count = full.advantages.len();
        for (name, cfg) in configs() {
            for &device in &devices {
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let want = vppo.forward(&full.batch()).unwrap();
                let want_grad = grad(&vppo, &full.batch(), &want);
                for size in [1, 2, 3, 4] {
                    let cut = splits(b_count, 2, size, seed);
                    let (full2, cut2, cfg2) = (full.clone(), cut.clone(), cfg.clone());
                    let got = common::on_ranks(size, move |rank, g| {
                        let mine = common::part(&full2, cut2[rank], cut2[rank + 1], 0, full2.vocab);
                        let vppo = Vppo::new(cfg2.clone(), device).unwrap();
                        let out = vppo.forward_data_parallel(&mine.batch(), g);
                        out.map(|(o, global)| {
                            let gr = grad(&global, &mine.batch(), &o);
                            (o, gr)
                        })
                    });
                    let case = format!("seed {seed}, {name}, {device:?}, {size} ranks {cut:?}");
                    let got: Vec<(VppoOutput, Vec<f32>)> = got
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect();
                    let loss: f64 = got.iter().map(|(o, _)| o.loss).sum();
                    let kl_loss: f64 = got.iter().map(|(o, _)| o.kl_loss).sum();
                    assert!(
                        close(kl_loss, want.kl_loss, 1e-5),
                        "{case}: kl_loss {kl_loss} vs {}",
                        want.kl_loss
                    );
                    assert!(
                        close(loss, want.loss, 1e-5),
                        "{case}: loss {loss} vs {}",
                        want.loss
                    );
                    let cat = |f: &dyn Fn(&VppoOutput) -> Vec<f64>| -> Vec<f64> {
                        got.iter().flat_map(|(o, _)| f(o)).collect()
                    };
                    let dlogp = cat(&|o| o.tokens.dlogp.iter().map(|&x| x as f64).collect());
                    let alpha = cat(&|o| o.responses.alpha.iter().map(|&x| x as f64).collect());
                    let mask: Vec<u8> = got
                        .iter()
                        .flat_map(|(o, _)| o.tokens.mask.clone())
                        .collect();
                    let g: Vec<f32> = got.iter().flat_map(|(_, g)| g.clone()).collect();
                    assert_eq!(mask, want.tokens.mask, "{case}: mask");
                    for (b, (&a, &w)) in alpha.iter().zip(&want.responses.alpha).enumerate() {
                        assert!(close(a, w as f64, 1e-5), "{case}: alpha {b}: {a} vs {w}");
                    }
                    for (t, (&x, &w)) in dlogp.iter().zip(&want.tokens.dlogp).enumerate() {
                        assert!(close(x, w as f64, 1e-5), "{case}: dlogp {t}: {x} vs {w}");
                    }
                    for (i, (&x, &w)) in g.iter().zip(&want_grad).enumerate() {
                        assert!(
                            close(x as f64, w as f64, 1e-5),
                            "{case}: grad {i}: {x} vs {w}"
                        );
                    }
                    for (o, _) in &got {
                        assert_eq!(o.token_normalizer, want.token_normalizer, "{case}: Z");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, seeds * 8 * 4 * devices.len() as u64);
}

#[test]
fn bad_input_on_one_rank_is_an_error_on_every_rank() {
    let spec = BatchSpec {
        groups: (4, 4),
        group_size: 1,
        ..BatchSpec::default()
    };
    let full = std::sync::Arc::new(seeded_batch(3, &spec));
    for device in [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)] {
        let full2 = full.clone();
        let got = common::on_ranks(3, move |rank, g| {
            let mut mine = common::part(&full2, rank, rank + 1, 0, full2.vocab);
            if rank == 1 {
                mine.old_logp.iter_mut().for_each(|x| *x = f32::NAN);
                mine.old_logp.push(f32::NAN); // and one too many: a shape error
            }
            Vppo::new(VppoConfig::default(), device)
                .unwrap()
                .forward_data_parallel(&mine.batch(), g)
                .map(|(o, _)| o)
        });
        for (rank, r) in got.iter().enumerate() {
            match (rank, r) {
                (1, Err(VppoError::Shape { .. })) => {}
                (_, Err(VppoError::GroupFailed { rank: r, failed: 1 })) if *r == rank => {}
                _ => panic!("{device:?}, rank {rank}: {r:?}"),
            }
        }
    }
}

#[test]
fn ranks_with_different_configs_are_an_error_on_every_rank() {
    let spec = BatchSpec::default();
    let full = std::sync::Arc::new(seeded_batch(5, &spec));
    let got = common::on_ranks(2, move |rank, g| {
        let cfg = VppoConfig {
            top_fraction: if rank == 0 { 0.4 } else { 0.5 },
            ..VppoConfig::default()
        };
        Vppo::new(cfg, Device::Reference)
            .unwrap()
            .forward_data_parallel(&full.batch(), g)
            .map(|(o, _)| o)
    });
    for r in &got {
        assert!(matches!(r, Err(VppoError::GroupConfig { .. })), "{r:?}");
    }
}

#[test]
fn the_thread_group_reduces_in_rank_order() {
    let got = common::on_ranks(4, |rank, g| {
        assert_eq!((g.rank(), g.size()), (rank, 4));
        let mut v = [rank as f64, -(rank as f64), 0.1 * rank as f64];
        g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        let mut m = [rank as f64, -(rank as f64)];
        g.all_reduce(&mut m, ReduceOp::Max).unwrap();
        (v, m)
    });
    for (v, m) in &got {
        assert_eq!(v[..2], [6.0, -6.0]);
        assert_eq!(
            v[2].to_bits(),
            (((0.0 + 0.1) + 0.2) + 0.1 * 3.0f64).to_bits()
        );
        assert_eq!(*m, [3.0, 0.0]);
    }
    // different lengths on different ranks: an error on every rank, not a hang
    let got = common::on_ranks(2, |rank, g| {
        let mut v = vec![1.0; rank + 1];
        g.all_reduce(&mut v, ReduceOp::Sum)
    });
    assert!(got.iter().all(|r| r.is_err()), "{got:?}");
    assert!(ThreadGroup::new(0).is_err());
}
