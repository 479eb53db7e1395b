//! Rows (SPEC section 10): the logits read in place from a larger [R, V] tensor through `rows`, the
//! masked logits through `masked_rows` (any order) or through `rows`, on the reference and the
//! kernels (SIMT executor): the same outputs as the compact [N, V] batch, a gradient of the shape of
//! the big tensor with zero rows where no token reads, and the errors that name `rows` / `masked_rows`.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vppo::{
    Batch, Device, Dtype, GradMut, LaneOrder, Logits, OwnedBatch, SavedForward, Tensor, Vppo,
    VppoConfig, VppoError,
};

fn with_rows<'a>(owned: &'a OwnedBatch, s: &'a common::Spread) -> Batch<'a> {
    Batch {
        logits: Logits::F32(&s.logits),
        logits_masked: Logits::F32(&s.masked),
        rows: Some(&s.rows),
        masked_rows: Some(&s.masked_rows),
        ..owned.batch()
    }
}

fn devices() -> [Device; 3] {
    [
        Device::Reference,
        Device::Simt(LaneOrder::Forward),
        Device::Simt(LaneOrder::Reverse),
    ]
}

fn random(seed: u64) -> (OwnedBatch, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let spec = common::BatchSpec {
        vocab: (1, 37),
        max_len: 9,
        ..Default::default()
    };
    (common::random_batch(&mut rng, &spec).to_f32(), rng)
}

#[test]
fn rows_give_the_outputs_and_gradient_of_the_compact_batch() {
    for seed in 0..12 {
        let (owned, mut rng) = random(seed);
        let s = common::spread(&owned, &mut rng);
        let (v, n) = (owned.vocab, owned.targets.len());
        for device in devices() {
            let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
            let (want, want_grad) = vppo.loss_and_grad(&owned.batch()).unwrap();
            let (got, got_grad) = vppo.loss_and_grad(&with_rows(&owned, &s)).unwrap();
            // The same values in the same order, only found elsewhere: the same numbers (the kernels'
            // vector loads may split a row at another alignment, so allow rounding).
            assert_eq!(got.tokens.mask, want.tokens.mask, "seed {seed} {device:?}");
            assert_eq!(got.responses.k, want.responses.k);
            let close = |a: f32, b: f32| a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            for (name, x, y) in [
                ("logp", &got.tokens.logp, &want.tokens.logp),
                ("kl", &got.tokens.kl, &want.tokens.kl),
                ("lse", &got.tokens.lse, &want.tokens.lse),
                ("dlogp", &got.tokens.dlogp, &want.tokens.dlogp),
            ] {
                for t in 0..n {
                    assert!(
                        close(x[t], y[t]),
                        "{name}[{t}] {} vs {} ({device:?})",
                        x[t],
                        y[t]
                    );
                }
            }
            assert!((got.loss - want.loss).abs() <= 1e-6 * (1.0 + want.loss.abs()));
            assert_eq!(got_grad.len(), s.r * v);
            let mut owner = vec![None; s.r];
            for (t, &r) in s.rows.iter().enumerate() {
                owner[r as usize] = Some(t);
            }
            for (r, o) in owner.iter().enumerate() {
                let row = &got_grad[r * v..(r + 1) * v];
                match o {
                    None => assert!(row.iter().all(|&x| x == 0.0), "row {r} not zero"),
                    Some(t) => {
                        for (j, (&g, &w)) in row.iter().zip(&want_grad[t * v..]).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                                "grad[{r}, {j}] {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn logits_masked_is_read_through_rows_when_it_has_the_shape_of_logits() {
    let (owned, mut rng) = random(3);
    let mut s = common::spread(&owned, &mut rng);
    let v = owned.vocab;
    // logits_masked [R, V] laid out like logits: token t's masked row at rows[t].
    let b = owned.logits_masked.to_f32();
    let mut masked = vec![0.5f32; s.r * v];
    for (t, &row) in s.rows.iter().enumerate() {
        masked[row as usize * v..(row as usize + 1) * v].copy_from_slice(&b[t * v..(t + 1) * v]);
    }
    s.masked = masked;
    for device in devices() {
        let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
        let want = vppo.forward(&owned.batch()).unwrap();
        let got = vppo
            .forward(&Batch {
                masked_rows: None,
                ..with_rows(&owned, &s)
            })
            .unwrap();
        assert_eq!(got.tokens.mask, want.tokens.mask);
        for (x, y) in got.tokens.kl.iter().zip(&want.tokens.kl) {
            assert!(
                x == y || (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{x} vs {y}"
            );
        }
    }
}

#[test]
fn backward_saved_in_place_over_rows_zeroes_the_other_rows() {
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let (owned, mut rng) = random(5);
        let s = common::spread(&owned, &mut rng);
        let v = owned.vocab;
        for device in devices() {
            let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
            let batch = with_rows(&owned, &s);
            let (out, want) = vppo.loss_and_grad(&batch).unwrap();
            let saved = SavedForward {
                targets: &owned.targets,
                lse: &out.tokens.lse,
                dlogp: &out.tokens.dlogp,
                rows: Some(&s.rows),
            };
            // Out of place, f32: the gradient of backward_into (the reference there recomputes lse
            // in f64, here it reads the f32 lse: rounding apart).
            let mut grad = vec![7.0f32; s.r * v];
            vppo.backward_saved(Some(batch.logits), v, &saved, GradMut::F32(&mut grad))
                .unwrap();
            for (g, w) in grad.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{g} vs {w}");
            }
            // In place in the logits dtype: the whole [R, V] buffer becomes the gradient. The junk
            // rows (NaN included) become zeros without being read.
            let tol = if dtype == Dtype::F32 { 1e-5 } else { 1e-2 };
            match dtype {
                Dtype::F32 => {
                    let mut buf = s.logits.clone();
                    vppo.backward_saved(None, v, &saved, GradMut::F32(&mut buf))
                        .unwrap();
                    for (g, w) in buf.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-6 + tol * w.abs(), "{g} vs {w}");
                    }
                }
                _ => {
                    let mut buf: Vec<half::bf16> =
                        s.logits.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    // The saved lse is the one of the f32 logits; rounding the logits to bf16 moves
                    // the softmax by up to 2^-8 relative: compare loosely, zeros exactly.
                    vppo.backward_saved(None, v, &saved, GradMut::Bf16(&mut buf))
                        .unwrap();
                    for (g, w) in buf.iter().zip(&want) {
                        let g = g.to_f32();
                        if *w == 0.0 {
                            assert_eq!(g, 0.0);
                        } else {
                            assert!((g - w).abs() <= 1e-3 + 2e-2 * w.abs(), "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn no_token_gives_a_gradient_of_zero_rows() {
    // N = 0 with rows: the logits are still [R, V] and so is the gradient, every row zero (none is
    // read: the junk, NaN included, stays unread), out of place over a dirty buffer and in place.
    let (owned, mut rng) = random(7);
    let v = owned.vocab;
    let r = 4;
    let junk: Vec<f32> = (0..r * v)
        .map(|i| {
            if i % 5 == 2 {
                f32::NAN
            } else {
                rng.gen_range(-3.0f32..3.0)
            }
        })
        .collect();
    let cu = vec![0i32; owned.advantages.len() + 1];
    let batch = Batch {
        logits: Logits::F32(&junk),
        logits_masked: Logits::F32(&junk),
        targets: &[],
        old_logp: &[],
        cu_seqlens: &cu,
        rows: Some(&[]),
        masked_rows: None,
        ..owned.batch()
    };
    for device in devices() {
        let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
        let out = vppo.forward(&batch).unwrap();
        assert_eq!(out.loss, 0.0);
        let mut grad = vec![7.0f32; r * v];
        vppo.backward_into(&batch, &out, GradMut::F32(&mut grad))
            .unwrap();
        assert!(grad.iter().all(|&g| g == 0.0), "{device:?}: {grad:?}");
        let saved = SavedForward {
            targets: &[],
            lse: &[],
            dlogp: &[],
            rows: Some(&[]),
        };
        let mut grad = vec![half::bf16::from_f32(7.0); r * v];
        vppo.backward_saved(Some(batch.logits), v, &saved, GradMut::Bf16(&mut grad))
            .unwrap_err();
        let mut grad = vec![7.0f32; r * v];
        vppo.backward_saved(Some(batch.logits), v, &saved, GradMut::F32(&mut grad))
            .unwrap();
        assert!(grad.iter().all(|&g| g == 0.0), "{device:?}: {grad:?}");
        let mut buf = junk.clone();
        vppo.backward_saved(None, v, &saved, GradMut::F32(&mut buf))
            .unwrap();
        assert!(
            buf.iter().all(|&g| g == 0.0),
            "{device:?} in place: {buf:?}"
        );
    }
}

fn error_of(batch: &Batch) -> VppoError {
    let mut last = None;
    for device in devices() {
        let e = Vppo::new(VppoConfig::default(), device)
            .unwrap()
            .forward(batch)
            .unwrap_err();
        if let Some(prev) = &last {
            assert_eq!(&e, prev, "executors disagree");
        }
        last = Some(e);
    }
    last.unwrap()
}

#[test]
fn bad_rows_are_errors_naming_the_index_and_position() {
    let (owned, mut rng) = random(7);
    let s = common::spread(&owned, &mut rng);
    let n = owned.targets.len();
    assert!(n >= 3, "the seed must give a few tokens");
    let base = with_rows(&owned, &s);

    let mut swapped = s.rows.clone();
    swapped.swap(1, 2);
    let e = error_of(&Batch {
        rows: Some(&swapped),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::RowIndex {
                tensor: Tensor::Rows,
                position: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("strictly increasing"), "{e}");

    let mut repeated = s.rows.clone();
    repeated[1] = repeated[0];
    let e = error_of(&Batch {
        rows: Some(&repeated),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::RowIndex {
                tensor: Tensor::Rows,
                position: 1,
                ..
            }
        ),
        "{e}"
    );

    let mut beyond = s.rows.clone();
    *beyond.last_mut().unwrap() = s.r as i64;
    let e = error_of(&Batch {
        rows: Some(&beyond),
        ..base
    });
    assert!(
        matches!(e, VppoError::RowIndex { tensor: Tensor::Rows, position, .. } if position == n - 1),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!("outside [0, {})", s.r)),
        "{e}"
    );

    let mut negative = s.rows.clone();
    negative[0] = -1;
    let e = error_of(&Batch {
        rows: Some(&negative),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::RowIndex {
                tensor: Tensor::Rows,
                position: 0,
                ..
            }
        ),
        "{e}"
    );

    let e = error_of(&Batch {
        rows: Some(&s.rows[..n - 1]),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::Shape {
                tensor: Tensor::Rows,
                ..
            }
        ),
        "{e}"
    );

    let mut masked_beyond = s.masked_rows.clone();
    masked_beyond[1] = (n + 2) as i64;
    let e = error_of(&Batch {
        masked_rows: Some(&masked_beyond),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::RowIndex {
                tensor: Tensor::MaskedRows,
                position: 1,
                ..
            }
        ),
        "{e}"
    );

    let e = error_of(&Batch {
        logits: Logits::F32(&s.logits[..s.logits.len() - 1]),
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::Shape {
                tensor: Tensor::Logits,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("whole number of rows"), "{e}");

    // Without masked_rows, logits_masked must be [N, V] or the shape of logits.
    let e = error_of(&Batch {
        masked_rows: None,
        ..base
    });
    assert!(
        matches!(
            e,
            VppoError::Shape {
                tensor: Tensor::LogitsMasked,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_bad_value_is_named_by_its_token_row() {
    let (owned, mut rng) = random(9);
    let mut s = common::spread(&owned, &mut rng);
    let v = owned.vocab;
    let t = owned.targets.len() / 2;
    let y = owned.targets[t] as usize;
    s.logits[s.rows[t] as usize * v + y] = f32::INFINITY;
    let e = error_of(&with_rows(&owned, &s));
    assert!(
        matches!(e, VppoError::NonFinite { tensor: Tensor::Logits, location: vppo::Location::Row(r), .. } if r == t),
        "{e}"
    );
}
