//! Sequence parallel (SPEC section 11, src/parallel/sequence.rs): a batch cut at token positions
//! over 1 to 4 ranks (threads of a `ThreadGroup`), so that responses are split into pieces on
//! consecutive ranks (one spans three ranks), each rank calling `Vppo::forward_sequence_parallel`
//! on its pieces, against the unsplit forward on the same device: the mask exactly, every token's
//! dlogp and gradient row, each piece's Sbar, k and alpha (its whole response's), and the group's
//! loss on every rank. Bad layouts are errors on every rank, with no hang.

mod common;

use std::sync::Arc;

use common::{seeded_batch, BatchSpec};
use vppo::{
    Aggregation, Device, Dtype, GradMut, LossType, MaskBy, Vppo, VppoConfig, VppoError, VppoOutput,
};

/// Token cut points for `size` ranks, each rank at least one token. With 3 or more ranks the
/// first two cuts fall inside the longest response (when it has at least 3 tokens), so that it
/// spans rank 1 whole; the other cuts are spread over the rest.
fn cuts(cu: &[i32], size: usize) -> Vec<usize> {
    let n = *cu.last().unwrap() as usize;
    let mut c = vec![0];
    let longest = cu
        .windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
        .max_by_key(|(s, e)| e - s)
        .unwrap_or((0, 0));
    if size >= 3 && longest.1 - longest.0 >= 3 && longest.0 + 2 + (size - 3) < n {
        c.push(longest.0 + 1);
        c.push(longest.0 + 2);
    }
    while c.len() < size {
        let (prev, left) = (*c.last().unwrap(), size - c.len());
        c.push((prev + (n - prev) / (left + 1)).max(prev + 1).min(n - left));
    }
    c.push(n);
    c
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    got == want || (got - want).abs() <= tol * want.abs().max(1.0)
}

#[test]
fn the_pieces_give_the_unsplit_mask_and_gradient() {
    let mut devices = vec![Device::Reference];
    devices.extend(common::devices());
    let configs = [
        VppoConfig::default(),
        VppoConfig {
            aggregation: Aggregation::SeqMeanTokenMean,
            loss_type: LossType::Gspo,
            ..VppoConfig::default()
        },
        VppoConfig {
            mask_by: MaskBy::PerceptionOrEntropy,
            aggregation: Aggregation::SeqMeanTokenSum,
            group_size: 2,
            shaping: vppo::Shaping::Linear,
            ..VppoConfig::default()
        },
    ];
    let seeds = if std::env::var_os("VPPO_TEST_DEVICE").is_some() {
        2
    } else {
        6
    };
    let (mut checked, mut spans) = (0, 0);
    for seed in 0..seeds {
        let spec = BatchSpec {
            dtype: [Dtype::F32, Dtype::Bf16, Dtype::F16][seed as usize % 3],
            groups: (2, 3),
            group_size: 2,
            max_len: 12,
            ties: seed % 2 == 0,
            ..BatchSpec::default()
        };
        let full = Arc::new(seeded_batch(seed, &spec));
        let n = full.targets.len();
        for cfg in &configs {
            for &device in &devices {
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let want = vppo.forward(&full.batch()).unwrap();
                let mut want_grad = vec![0.0f32; n * full.vocab];
                vppo.backward_into(&full.batch(), &want, GradMut::F32(&mut want_grad))
                    .unwrap();
                for size in [1, 2, 3, 4].into_iter().filter(|&s| s <= n) {
                    let c = cuts(&full.cu_seqlens, size);
                    let (full2, c2, cfg2) = (full.clone(), c.clone(), cfg.clone());
                    let got = common::on_ranks(size, move |rank, g| {
                        let (t0, t1) = (c2[rank], c2[rank + 1]);
                        let (mine, continues) = common::pieces(&full2, t0, t1);
                        // The rank reads its rows in place out of the whole tensors (SPEC section
                        // 10), at the addresses the unsplit run reads them: the kernels' per-row
                        // results (whose bits can depend on a row's 16-byte phase) are the same.
                        let rows: Vec<i64> = (t0 as i64..t1 as i64).collect();
                        let batch = vppo::Batch {
                            logits: full2.logits.view(),
                            logits_masked: full2.logits_masked.view(),
                            rows: Some(&rows),
                            masked_rows: Some(&rows),
                            ..mine.batch()
                        };
                        let vppo = Vppo::new(cfg2.clone(), device).unwrap();
                        let out = vppo.forward_sequence_parallel(&batch, continues, g)?;
                        let v = full2.vocab;
                        let mut grad = vec![0.0f32; full2.targets.len() * v];
                        vppo.backward_sequence_parallel(&batch, &out, GradMut::F32(&mut grad))?;
                        let others = grad[..t0 * v].iter().chain(&grad[t1 * v..]);
                        assert!(others.into_iter().all(|&x| x == 0.0), "rows of other ranks");
                        let own = grad[t0 * v..t1 * v].to_vec();
                        Ok::<_, VppoError>((out, own, mine.cu_seqlens.clone(), continues))
                    });
                    let case = format!("seed {seed}, {cfg:?}, {device:?}, cuts {c:?}");
                    let got: Vec<(VppoOutput, Vec<f32>, Vec<i32>, bool)> = got
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{case}: {e}")))
                        .collect();
                    let mask: Vec<u8> = got.iter().flat_map(|r| r.0.tokens.mask.clone()).collect();
                    assert_eq!(mask, want.tokens.mask, "{case}: mask");
                    let dlogp: Vec<f32> =
                        got.iter().flat_map(|r| r.0.tokens.dlogp.clone()).collect();
                    for (t, (&a, &b)) in dlogp.iter().zip(&want.tokens.dlogp).enumerate() {
                        assert!(
                            close(a as f64, b as f64, 1e-5),
                            "{case}: dlogp {t}: {a} vs {b}"
                        );
                    }
                    let grad: Vec<f32> = got.iter().flat_map(|r| r.1.clone()).collect();
                    for (i, (&a, &b)) in grad.iter().zip(&want_grad).enumerate() {
                        assert!(
                            close(a as f64, b as f64, 1e-5),
                            "{case}: grad {i}: {a} vs {b}"
                        );
                    }
                    // each piece carries its whole response's Sbar, k and alpha
                    let mut response = 0usize;
                    for (rank, (o, _, cu, continues)) in got.iter().enumerate() {
                        assert!(
                            close(o.loss, want.loss, 1e-5),
                            "{case}: rank {rank} loss {} vs {}",
                            o.loss,
                            want.loss
                        );
                        if *continues {
                            response -= 1;
                        }
                        for i in 0..cu.len() - 1 {
                            let b = response + i;
                            assert_eq!(o.responses.k[i], want.responses.k[b], "{case}: k {b}");
                            for (what, x, w) in [
                                ("sbar", o.responses.sbar[i], want.responses.sbar[b]),
                                ("alpha", o.responses.alpha[i], want.responses.alpha[b]),
                            ] {
                                assert!(
                                    close(x as f64, w as f64, 1e-5),
                                    "{case}: {what} {b}: {x} vs {w}"
                                );
                            }
                        }
                        response += cu.len() - 1;
                    }
                    assert_eq!(response, want.responses.k.len(), "{case}");
                    // a response over three ranks: a middle rank holds one piece of it only
                    spans += got
                        .windows(2)
                        .filter(|w| w[0].3 && w[0].2.len() == 2 && w[1].3)
                        .count();
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 0);
    assert!(spans > 0, "no response spanned three ranks");
}

/// Every test of this file again on `Device::Cuda(0)` through the fake CUDA driver.
#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

#[test]
fn bad_layouts_and_bad_input_are_errors_on_every_rank() {
    let spec = BatchSpec {
        groups: (3, 3),
        group_size: 1,
        max_len: 6,
        ..BatchSpec::default()
    };
    let full = Arc::new(seeded_batch(21, &spec));
    let n = full.targets.len();
    assert!(n >= 2);
    // 0: rank 0 claims to continue; 1: a continued piece with another advantage; 2: a NaN on rank 1
    for case in 0..3 {
        let full2 = full.clone();
        let got = common::on_ranks(2, move |rank, g| {
            let cut = [0, n / 2, n];
            let (mut mine, mut continues) = common::pieces(&full2, cut[rank], cut[rank + 1]);
            match (case, rank) {
                (0, 0) => continues = true,
                (1, 1) => {
                    continues = true;
                    mine.advantages[0] += 1.0;
                }
                (2, 1) => mine.old_logp[0] = f32::NAN,
                _ => {}
            }
            Vppo::new(
                VppoConfig::default(),
                Device::Simt(vppo::LaneOrder::Forward),
            )
            .unwrap()
            .forward_sequence_parallel(&mine.batch(), continues, g)
        });
        for (rank, r) in got.iter().enumerate() {
            let ok = matches!(
                (case, rank, r),
                (0 | 1, _, Err(VppoError::Shape { .. }))
                    | (2, 1, Err(VppoError::NonFinite { .. }))
                    | (2, 0, Err(VppoError::GroupFailed { failed: 1, .. }))
            );
            assert!(ok, "case {case}, rank {rank}: {r:?}");
        }
    }
}
