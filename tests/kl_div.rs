//! The general KL op (SPEC section 13, `vppo.torch.kl`; src/kl_div.rs): the forward (the perception
//! kernel in partial mode, finished on the host) and the backward (kernels/kl_div.cu) against the
//! f64 reference (src/reference/kl_div.rs) on every executor (the SIMT executor in both lane orders,
//! and the fake CUDA driver through `all_tests_through_the_fake_cuda_driver`), the reference against
//! central finite differences, rows, -inf entries, and the errors.

mod common;

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vppo::{Device, Dtype, KlBatch, KlDiv, KlOutput, Location, OwnedLogits, Tensor, VppoError};

/// Every test of this file again on `Device::Cuda(0)` through the fake CUDA driver, in both lane
/// orders (the GPU host path of the op: uploads, the launches, the copies back).
#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

fn to_dtype(x: Vec<f32>, dtype: Dtype) -> OwnedLogits {
    match dtype {
        Dtype::F32 => OwnedLogits::F32(x),
        Dtype::F16 => OwnedLogits::F16(x.into_iter().map(f16::from_f32).collect()),
        Dtype::Bf16 => OwnedLogits::Bf16(x.into_iter().map(bf16::from_f32).collect()),
    }
}

fn zeros(len: usize, dtype: Dtype) -> OwnedLogits {
    to_dtype(vec![0.0; len], dtype)
}

fn widened(x: &OwnedLogits) -> Vec<f64> {
    let v = x.view();
    (0..v.len()).map(|i| v.get(i)).collect()
}

/// Two logits tensors of `rp` and `rq` rows of V: values on a grid of 1/64 in [-6, 6], q a
/// perturbation of p (sometimes equal), -inf entries in p (then, sometimes, in q too) but never a
/// q = -inf under a finite p on a row a token reads (KL finite).
struct Case {
    p: OwnedLogits,
    q: OwnedLogits,
    vocab: usize,
    p_rows: Option<Vec<i64>>,
    q_rows: Option<Vec<i64>>,
    n: usize,
}

impl Case {
    fn batch(&self) -> KlBatch<'_> {
        KlBatch {
            p_logits: self.p.view(),
            q_logits: self.q.view(),
            vocab: self.vocab,
            p_rows: self.p_rows.as_deref(),
            q_rows: self.q_rows.as_deref(),
        }
    }
}

/// A strictly increasing choice of n rows out of r.
fn choose(rng: &mut ChaCha8Rng, n: usize, r: usize) -> Vec<i64> {
    let mut all: Vec<i64> = (0..r as i64).collect();
    for i in 0..n {
        let j = rng.gen_range(i..r);
        all.swap(i, j);
    }
    let mut c = all[..n].to_vec();
    c.sort();
    c
}

fn random_case(seed: u64, dtype: Dtype, vocab: usize, n: usize, rows: bool) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let grid = |rng: &mut ChaCha8Rng| (rng.gen_range(-384i32..=384) as f32) / 64.0;
    // with rows: p [R, V] read through p_rows, q either [R', V] through q_rows or through p_rows
    let (rp, p_rows) = if rows {
        let r = n + rng.gen_range(0..4);
        (r, Some(choose(&mut rng, n, r)))
    } else {
        (n, None)
    };
    let own_q_rows = rows && rng.gen_bool(0.6);
    let (rq, q_rows) = if own_q_rows {
        let r = n + rng.gen_range(0..4);
        (r, Some(choose(&mut rng, n, r)))
    } else {
        (rp, None)
    };
    let mut p: Vec<f32> = (0..rp * vocab).map(|_| grid(&mut rng)).collect();
    let mut q: Vec<f32> = (0..rq * vocab).map(|_| grid(&mut rng)).collect();
    let p_row = |t: usize| p_rows.as_ref().map_or(t, |r| r[t] as usize);
    let q_row = |t: usize| q_rows.as_ref().map_or(p_row(t), |r| r[t] as usize);
    for t in 0..n {
        let (a, b) = (p_row(t) * vocab, q_row(t) * vocab);
        let style = rng.gen_range(0..4);
        for v in 0..vocab {
            match style {
                0 => q[b + v] = p[a + v], // equal rows: kl = 0
                1 => q[b + v] = p[a + v] + (rng.gen_range(-8i32..=8) as f32) / 64.0, // close
                _ => {}
            }
            if vocab > 1 && rng.gen_bool(0.08) {
                p[a + v] = f32::NEG_INFINITY; // p_v = 0
                if rng.gen_bool(0.5) {
                    q[b + v] = f32::NEG_INFINITY; // both 0
                }
            }
        }
        // keep one finite entry of p and q's row at -inf only under p = -inf
        if p[a..a + vocab].iter().all(|x| *x == f32::NEG_INFINITY) {
            p[a] = 0.5;
        }
        for v in 0..vocab {
            if p[a + v] != f32::NEG_INFINITY && q[b + v] == f32::NEG_INFINITY {
                q[b + v] = -1.0;
            }
        }
        if q[b..b + vocab].iter().all(|x| *x == f32::NEG_INFINITY) {
            q[b] = 0.25;
        }
    }
    Case {
        p: to_dtype(p, dtype),
        q: to_dtype(q, dtype),
        vocab,
        p_rows,
        q_rows,
        n,
    }
}

fn kernel_devices() -> Vec<Device> {
    common::devices()
}

fn close(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= atol + rtol * want.abs(),
        "{what}: {got} vs reference {want} (|diff| {:e})",
        (got - want).abs()
    );
}

/// The relative precision of one rounding to `dtype`.
fn ulp(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-23),
        Dtype::F16 => 2f64.powi(-10),
        Dtype::Bf16 => 2f64.powi(-7),
    }
}

struct Grads {
    p: OwnedLogits,
    q: OwnedLogits,
}

/// The backward into buffers filled with 7.0 first, so an element the op does not write shows.
fn backward(op: &KlDiv, case: &Case, out: &KlOutput, u: &[f32]) -> vppo::Result<Grads> {
    let dtype = case.p.dtype();
    let mut g = Grads {
        p: to_dtype(vec![7.0; case.p.len()], dtype),
        q: to_dtype(vec![7.0; case.q.len()], dtype),
    };
    op.backward(
        &case.batch(),
        &out.saved(),
        u,
        g.p.as_grad_mut(),
        g.q.as_grad_mut(),
    )?;
    Ok(g)
}

fn upstream(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    (0..n)
        .map(|_| {
            if rng.gen_bool(0.2) {
                0.0
            } else {
                rng.gen_range(-2.0f32..2.0)
            }
        })
        .collect()
}

/// (dtype, V, N, rows, temperature) of the random cases: V below a vector, around the vector
/// width, and long rows (several vectors per thread, rows on both 16-byte phases).
fn shapes() -> Vec<(Dtype, usize, usize, bool, f64)> {
    let mut s = Vec::new();
    for (i, dtype) in [Dtype::F32, Dtype::Bf16, Dtype::F16]
        .into_iter()
        .enumerate()
    {
        for (j, &(v, n)) in [
            (1, 3),
            (5, 7),
            (8, 4),
            (37, 6),
            (1024, 3),
            (2053, 2),
            (4096, 2),
        ]
        .iter()
        .enumerate()
        {
            let tau = [1.0, 0.7, 1.6][(i + j) % 3];
            s.push((dtype, v, n, (i + j) % 2 == 1, tau));
        }
    }
    s
}

#[test]
fn forward_and_backward_match_the_reference() {
    let reference_of = |tau| KlDiv::new(tau, Device::Reference).unwrap();
    for (seed, (dtype, v, n, rows, tau)) in shapes().into_iter().enumerate() {
        let seed = seed as u64;
        let case = random_case(seed, dtype, v, n, rows);
        let u = upstream(seed, n);
        let want = reference_of(tau).forward(&case.batch()).unwrap();
        let want_g = backward(&reference_of(tau), &case, &want, &u).unwrap();
        for device in kernel_devices() {
            let op = KlDiv::new(tau, device).unwrap();
            let got = op.forward(&case.batch()).unwrap();
            let at = format!("{device:?} {dtype:?} V={v} N={n} rows={rows} tau={tau} seed={seed}");
            for t in 0..n {
                close(
                    &format!("kl[{t}] {at}"),
                    got.kl[t] as f64,
                    want.kl[t] as f64,
                    2e-6,
                    2e-4,
                );
                for (name, g, w) in [
                    ("lse_p", got.lse_p[t], want.lse_p[t]),
                    ("lse_q", got.lse_q[t], want.lse_q[t]),
                ] {
                    close(&format!("{name}[{t}] {at}"), g as f64, w as f64, 1e-5, 1e-6);
                }
            }
            let g = backward(&op, &case, &got, &u).unwrap();
            for (name, got_g, want_g) in [("grad_p", &g.p, &want_g.p), ("grad_q", &g.q, &want_g.q)]
            {
                let (got_g, want_g) = (widened(got_g), widened(want_g));
                for (i, (&x, &w)) in got_g.iter().zip(&want_g).enumerate() {
                    // a few roundings of the dtype, and f32 arithmetic on values of order 1
                    close(
                        &format!("{name}[{}, {}] {at}", i / v, i % v),
                        x,
                        w,
                        2e-6,
                        4.0 * ulp(dtype) + 1e-4,
                    );
                }
            }
            // a row no token reads, and a token with no upstream gradient, are exact +0.0
            for (name, grad, index, len) in [
                (
                    "grad_p",
                    &g.p,
                    case.p_rows.as_deref(),
                    case.batch().n_p_rows(),
                ),
                (
                    "grad_q",
                    &g.q,
                    case.batch().q_index(),
                    case.batch().n_q_rows(),
                ),
            ] {
                let x = widened(grad);
                for r in 0..len {
                    let token = match index {
                        Some(idx) => idx.iter().position(|&x| x as usize == r),
                        None => Some(r),
                    };
                    if token.is_none_or(|t| u[t] == 0.0) {
                        let row = &x[r * v..(r + 1) * v];
                        assert!(
                            row.iter().all(|x| *x == 0.0 && x.is_sign_positive()),
                            "{name} row {r} should be +0.0: {row:?} {at}"
                        );
                    }
                }
            }
        }
    }
}

/// The reference's gradient against central differences of the reference's own f64 KL, in f32
/// logits (a step of 1/32 is exact on the grid of the data), with -inf entries and rows.
#[test]
fn the_reference_gradient_is_the_derivative() {
    for (seed, tau) in [(11u64, 1.0), (12, 0.6), (13, 1.7)] {
        let case = random_case(seed, Dtype::F32, 9, 4, seed % 2 == 0);
        let n = case.n;
        let u = upstream(seed, n);
        let op = KlDiv::new(tau, Device::Reference).unwrap();
        let out = op.forward(&case.batch()).unwrap();
        let g = backward(&op, &case, &out, &u).unwrap();
        // L = sum_t u_t kl_t in f64
        let loss = |p: &[f32], q: &[f32]| -> f64 {
            let (pp, qq) = (OwnedLogits::F32(p.to_vec()), OwnedLogits::F32(q.to_vec()));
            let batch = KlBatch {
                p_logits: pp.view(),
                q_logits: qq.view(),
                ..case.batch()
            };
            let r = vppo::reference::kl_div::kl_div(&batch, tau).unwrap();
            r.kl.iter().zip(&u).map(|(k, &u)| k * u as f64).sum()
        };
        let (OwnedLogits::F32(p), OwnedLogits::F32(q)) = (&case.p, &case.q) else {
            unreachable!()
        };
        let h = 1.0 / 32.0;
        for (name, which, grad) in [("grad_p", 0, &g.p), ("grad_q", 1, &g.q)] {
            let grad = widened(grad);
            let base = if which == 0 { p } else { q };
            for i in 0..base.len() {
                if base[i] == f32::NEG_INFINITY {
                    assert_eq!(grad[i], 0.0, "{name}[{i}] at -inf");
                    continue;
                }
                let mut plus = base.clone();
                let mut minus = base.clone();
                plus[i] += h as f32;
                minus[i] -= h as f32;
                let fd = if which == 0 {
                    (loss(&plus, q) - loss(&minus, q)) / (2.0 * h)
                } else {
                    (loss(p, &plus) - loss(p, &minus)) / (2.0 * h)
                };
                close(
                    &format!("{name}[{i}] seed={seed} tau={tau}"),
                    grad[i],
                    fd,
                    2e-4,
                    2e-3,
                );
            }
        }
    }
}

/// Cases where the exact values are known: equal rows give kl = 0 and zero gradients; KL of two
/// distributions on two points, by hand.
#[test]
fn known_values() {
    // p = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    let p = OwnedLogits::F32(vec![0.0, 3f32.ln(), 1.0, 1.0]);
    let q = OwnedLogits::F32(vec![0.0, 0.0, 1.0, 1.0]);
    let batch = KlBatch {
        p_logits: p.view(),
        q_logits: q.view(),
        vocab: 2,
        p_rows: None,
        q_rows: None,
    };
    let exact = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    let mut devices = vec![Device::Reference];
    devices.extend(kernel_devices());
    for device in devices {
        let op = KlDiv::new(1.0, device).unwrap();
        let out = op.forward(&batch).unwrap();
        close(&format!("{device:?}"), out.kl[0] as f64, exact, 1e-7, 1e-6);
        assert_eq!(out.kl[1], 0.0, "{device:?}: equal rows");
        let mut gp = vec![0.0f32; 4];
        let mut gq = vec![0.0f32; 4];
        op.backward(
            &batch,
            &out.saved(),
            &[1.0, 1.0],
            vppo::GradMut::F32(&mut gp),
            vppo::GradMut::F32(&mut gq),
        )
        .unwrap();
        // d/dq logits: q - p = (1/4, -1/4); d/dp: p (log p/q - kl)
        let lp = [(0.25f64 / 0.5).ln(), (0.75f64 / 0.5).ln()];
        let want_p = [0.25 * (lp[0] - exact), 0.75 * (lp[1] - exact)];
        for v in 0..2 {
            close(
                &format!("{device:?} gp{v}"),
                gp[v] as f64,
                want_p[v],
                1e-6,
                1e-5,
            );
        }
        close(&format!("{device:?} gq0"), gq[0] as f64, 0.25, 1e-7, 1e-6);
        close(&format!("{device:?} gq1"), gq[1] as f64, -0.25, 1e-7, 1e-6);
        assert!(gp[2..].iter().chain(&gq[2..]).all(|x| x.abs() < 1e-7));
    }
}

fn all_devices() -> Vec<Device> {
    let mut d = vec![Device::Reference];
    d.extend(kernel_devices());
    d
}

fn forward_err(p: &[f32], q: &[f32], vocab: usize, tau: f64, device: Device) -> VppoError {
    let (p, q) = (OwnedLogits::F32(p.to_vec()), OwnedLogits::F32(q.to_vec()));
    let batch = KlBatch {
        p_logits: p.view(),
        q_logits: q.view(),
        vocab,
        p_rows: None,
        q_rows: None,
    };
    KlDiv::new(tau, device)
        .unwrap()
        .forward(&batch)
        .expect_err("bad input must be an error")
}

#[test]
fn bad_rows_are_errors_naming_tensor_and_row() {
    let inf = f32::INFINITY;
    let ninf = f32::NEG_INFINITY;
    let good = [0.0f32, 1.0, 2.0];
    for device in all_devices() {
        let cases: Vec<(Vec<f32>, Vec<f32>, VppoError)> = vec![
            (
                [good, [0.0, f32::NAN, 1.0]].concat(),
                [good, good].concat(),
                VppoError::NonFinite {
                    tensor: Tensor::PLogits,
                    location: Location::Row(1),
                    value: f64::NAN,
                },
            ),
            (
                [good, good].concat(),
                [good, [inf, 0.0, 0.0]].concat(),
                VppoError::NonFinite {
                    tensor: Tensor::QLogits,
                    location: Location::Row(1),
                    value: f64::INFINITY,
                },
            ),
            (
                [[ninf, ninf, ninf], good].concat(),
                [good, good].concat(),
                VppoError::AllNegInf {
                    tensor: Tensor::PLogits,
                    row: 0,
                },
            ),
            (
                [good, good].concat(),
                [good, [ninf, ninf, ninf]].concat(),
                VppoError::AllNegInf {
                    tensor: Tensor::QLogits,
                    row: 1,
                },
            ),
            // p_v > 0 where q_v = 0: KL = +inf, an error naming q_logits, the row and the column
            (
                [good, [ninf, 1.0, 0.0]].concat(),
                [good, [0.0, 1.0, ninf]].concat(),
                VppoError::KlInfinite {
                    tensor: Tensor::QLogits,
                    row: 1,
                    column: 2,
                },
            ),
        ];
        for (p, q, want) in cases {
            let got = forward_err(&p, &q, 3, 1.0, device);
            match (&got, &want) {
                (
                    VppoError::NonFinite {
                        tensor,
                        location,
                        value,
                    },
                    VppoError::NonFinite {
                        tensor: t,
                        location: l,
                        value: v,
                    },
                ) => {
                    assert_eq!((tensor, location), (t, l), "{device:?}");
                    assert!(value.is_nan() == v.is_nan() && (v.is_nan() || value == v));
                }
                _ => assert_eq!(got, want, "{device:?}"),
            }
            assert!(got.to_string().contains(match &want {
                VppoError::NonFinite { tensor, .. } | VppoError::AllNegInf { tensor, .. } =>
                    tensor.name(),
                _ => "q_logits",
            }));
        }
        // p = -inf where q = -inf is fine (both 0): kl over the rest
        let ok = KlDiv::new(1.0, device).unwrap().forward(&KlBatch {
            p_logits: OwnedLogits::F32(vec![ninf, 0.0, 0.0]).view(),
            q_logits: OwnedLogits::F32(vec![ninf, 0.0, 0.0]).view(),
            vocab: 3,
            p_rows: None,
            q_rows: None,
        });
        assert_eq!(ok.unwrap().kl, vec![0.0], "{device:?}");
        // a logit that overflows f32 divided by the temperature: the same error everywhere
        let got = forward_err(&[0.0, 1e38, 0.0, 0.0], &[0.0; 4], 2, 0.1, device);
        assert_eq!(
            got,
            VppoError::TemperatureOverflow {
                tensor: Tensor::PLogits,
                row: 0,
                value: 1e38f32 as f64,
                temperature: 0.1
            },
            "{device:?}"
        );
    }
}

#[test]
fn bad_shapes_and_indices_are_errors() {
    let p = OwnedLogits::F32(vec![0.0; 12]);
    let q = OwnedLogits::F32(vec![0.0; 12]);
    let q16 = OwnedLogits::F16(vec![f16::ZERO; 12]);
    let short = OwnedLogits::F32(vec![0.0; 9]);
    let base = KlBatch {
        p_logits: p.view(),
        q_logits: q.view(),
        vocab: 3,
        p_rows: None,
        q_rows: None,
    };
    let name = |b: KlBatch| -> String {
        let e = KlDiv::new(1.0, Device::Simt(vppo::LaneOrder::Forward))
            .unwrap()
            .forward(&b)
            .unwrap_err();
        let r = KlDiv::new(1.0, Device::Reference)
            .unwrap()
            .forward(&b)
            .unwrap_err();
        assert_eq!(e, r, "the same error on every device");
        e.to_string()
    };
    assert!(name(KlBatch {
        q_logits: q16.view(),
        ..base
    })
    .contains("q_logits"));
    assert!(name(KlBatch {
        q_logits: short.view(),
        ..base
    })
    .contains("q_logits"));
    assert!(name(KlBatch { vocab: 5, ..base }).contains("p_logits"));
    let (dec, out, two) = ([2i64, 1], [0i64, 4], [0i64, 1]);
    let e = name(KlBatch {
        p_rows: Some(&dec),
        ..base
    });
    assert!(e.contains("p_rows position 1"), "{e}");
    let e = name(KlBatch {
        p_rows: Some(&two),
        q_rows: Some(&out),
        ..base
    });
    assert!(e.contains("q_rows position 1"), "{e}");
    let e = name(KlBatch {
        p_rows: Some(&two),
        q_rows: Some(&dec[..1]),
        ..base
    });
    assert!(e.contains("q_rows"), "{e}");
    // q_rows must be strictly increasing too (each gradient row written by one token)
    let e = name(KlBatch {
        p_rows: Some(&two),
        q_rows: Some(&[1, 1]),
        ..base
    });
    assert!(e.contains("q_rows position 1"), "{e}");
    // the temperature
    assert!(KlDiv::new(0.0, Device::Reference)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
}

#[test]
fn bad_backward_inputs_are_errors() {
    let case = random_case(3, Dtype::Bf16, 6, 3, false);
    for device in all_devices() {
        let op = KlDiv::new(1.0, device).unwrap();
        let out = op.forward(&case.batch()).unwrap();
        let u = [1.0f32; 3];
        let mut gp = to_dtype(vec![7.0; case.p.len()], Dtype::Bf16);
        let mut gq = to_dtype(vec![7.0; case.q.len()], Dtype::Bf16);
        let mut gp32 = zeros(case.p.len(), Dtype::F32);
        // a gradient of another dtype
        let e = op
            .backward(
                &case.batch(),
                &out.saved(),
                &u,
                gp32.as_grad_mut(),
                gq.as_grad_mut(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("grad_p"), "{e}");
        // grad_kl of the wrong length, or not finite
        let e = op
            .backward(
                &case.batch(),
                &out.saved(),
                &u[..2],
                gp.as_grad_mut(),
                gq.as_grad_mut(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("grad_kl"), "{e}");
        let e = op
            .backward(
                &case.batch(),
                &out.saved(),
                &[1.0, f32::NAN, 1.0],
                gp.as_grad_mut(),
                gq.as_grad_mut(),
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("grad_kl has a non-finite value (NaN) at row 1"),
            "{e}"
        );
        // a saved value of the wrong length
        let short = KlOutput {
            lse_q: out.lse_q[..2].to_vec(),
            ..out.clone()
        };
        let e = op
            .backward(
                &case.batch(),
                &short.saved(),
                &u,
                gp.as_grad_mut(),
                gq.as_grad_mut(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("lse_q"), "{e}");
        // an upstream gradient that overflows the gradient's dtype: an error, both buffers zero
        let e = op
            .backward(
                &case.batch(),
                &out.saved(),
                &[3e38, 3e38, 3e38],
                gp.as_grad_mut(),
                gq.as_grad_mut(),
            )
            .unwrap_err();
        assert!(matches!(e, VppoError::Overflow { .. }), "{device:?}: {e}");
        assert!(widened(&gp).iter().chain(&widened(&gq)).all(|x| *x == 0.0));
    }
}

/// N = 0: no token, an empty output; with rows, the gradients are all zero.
#[test]
fn no_tokens() {
    let p = OwnedLogits::F32(vec![1.0; 6]);
    let q = OwnedLogits::F32(vec![1.0; 6]);
    let batch = KlBatch {
        p_logits: p.view(),
        q_logits: q.view(),
        vocab: 3,
        p_rows: Some(&[]),
        q_rows: Some(&[]),
    };
    for device in all_devices() {
        let op = KlDiv::new(1.0, device).unwrap();
        let out = op.forward(&batch).unwrap();
        assert!(out.kl.is_empty());
        let (mut gp, mut gq) = (vec![7.0f32; 6], vec![7.0f32; 6]);
        op.backward(
            &batch,
            &out.saved(),
            &[],
            vppo::GradMut::F32(&mut gp),
            vppo::GradMut::F32(&mut gq),
        )
        .unwrap();
        assert!(gp.iter().chain(&gq).all(|x| *x == 0.0), "{device:?}");
    }
}

/// The GPU, on a GPU (VPPO_TEST_DEVICE=cuda) or the fake driver; None (skipped) elsewhere.
fn gpu_for_device_buffers() -> Option<std::sync::Arc<vppo::cuda::Gpu>> {
    if kernel_devices() != [Device::Cuda(0)] {
        return None;
    }
    Some(vppo::cuda::Gpu::new(0).expect("the GPU of VPPO_TEST_DEVICE"))
}

/// Bits of a gradient, for exact comparison (-0.0 and +0.0 differ).
fn grad_bits(x: &OwnedLogits) -> Vec<u64> {
    widened(x).iter().map(|x| x.to_bits()).collect()
}

/// `OwnedLogits` uploaded on `stream`.
fn upload_logits(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    x: &OwnedLogits,
) -> vppo::tensor::DeviceTensor {
    match x {
        OwnedLogits::F32(v) => vppo::ByDtype::F32(stream.clone_htod(v).unwrap()),
        OwnedLogits::F16(v) => vppo::ByDtype::F16(stream.clone_htod(v).unwrap()),
        OwnedLogits::Bf16(v) => vppo::ByDtype::Bf16(stream.clone_htod(v).unwrap()),
    }
}

fn download_logits(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    x: &vppo::tensor::DeviceTensor,
) -> OwnedLogits {
    match x {
        vppo::ByDtype::F32(v) => OwnedLogits::F32(stream.clone_dtoh(v).unwrap()),
        vppo::ByDtype::F16(v) => OwnedLogits::F16(stream.clone_dtoh(v).unwrap()),
        vppo::ByDtype::Bf16(v) => OwnedLogits::Bf16(stream.clone_dtoh(v).unwrap()),
    }
}

/// The op on the caller's GPU buffers (`KlDiv::forward_device` / `backward_device`, the Python op's
/// CUDA path) against the host path on the same GPU (and so, on the fake driver, the SIMT executor
/// in the lane order of the run): the same kl, lse_p and lse_q bit for bit, and the same gradients
/// bit for bit into buffers of NaN (every element written), with and without rows, in every dtype,
/// above and below temperature 1. The inputs are uploaded on a stream of the caller's (on the fake
/// driver it runs only when waited for): the op orders itself after it. Then the errors: the same
/// error as the host path for bad rows, bad indices, bad saved values and an overflow (both
/// gradients zero then), and nothing written for a refused call.
#[test]
fn device_buffers_match_the_host_path() {
    let Some(gpu) = gpu_for_device_buffers() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let theirs = gpu.context().new_stream().unwrap();
    let up_rows = |r: &Option<Vec<i64>>| r.as_ref().map(|r| theirs.clone_htod(r).unwrap());
    let cases = shapes().into_iter().filter(|s| s.1 <= 1024);
    for (seed, (dtype, v, n, rows, tau)) in cases.enumerate() {
        let seed = seed as u64 + 100;
        let case = random_case(seed, dtype, v, n, rows);
        let u = upstream(seed, n);
        let at = format!("{dtype:?} V={v} N={n} rows={rows} tau={tau} seed={seed}");
        let op = KlDiv::new(tau, Device::Cuda(0)).unwrap();
        let want = op.forward(&case.batch()).unwrap();
        let want_g = backward(&op, &case, &want, &u).unwrap();

        let (p, q) = (
            upload_logits(&theirs, &case.p),
            upload_logits(&theirs, &case.q),
        );
        let (p_rows, q_rows) = (up_rows(&case.p_rows), up_rows(&case.q_rows));
        let db = vppo::DeviceKlBatch {
            p_logits: p.view(),
            q_logits: q.view(),
            vocab: v,
            p_rows: p_rows.as_ref(),
            q_rows: q_rows.as_ref(),
        };
        let got = op.forward_device(&db).unwrap();
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (name, g, w) in [
            ("kl", &got.kl, &want.kl),
            ("lse_p", &got.lse_p, &want.lse_p),
            ("lse_q", &got.lse_q, &want.lse_q),
        ] {
            assert_eq!(bits(g), bits(w), "{name} {at}");
        }
        let up = |x: &[f32]| theirs.clone_htod(x).unwrap();
        let (kl, lse_p, lse_q, grad_kl) = (up(&want.kl), up(&want.lse_p), up(&want.lse_q), up(&u));
        let saved = vppo::DeviceKlSaved {
            kl: &kl,
            lse_p: &lse_p,
            lse_q: &lse_q,
        };
        let mut gp = upload_logits(&theirs, &to_dtype(vec![f32::NAN; case.p.len()], dtype));
        let mut gq = upload_logits(&theirs, &to_dtype(vec![f32::NAN; case.q.len()], dtype));
        op.backward_device(&db, &saved, &grad_kl, gp.as_mut(), gq.as_mut())
            .unwrap();
        // backward_device returned after the kernel: the caller's stream reads the result at once
        assert_eq!(
            grad_bits(&download_logits(&theirs, &gp)),
            grad_bits(&want_g.p),
            "grad_p {at}"
        );
        assert_eq!(
            grad_bits(&download_logits(&theirs, &gq)),
            grad_bits(&want_g.q),
            "grad_q {at}"
        );
    }

    // Errors: the host path's, for the same batch.
    let f32s = |x: &[f32]| theirs.clone_htod(x).unwrap();
    let device_err = |p: &[f32], q: &[f32], vocab: usize, tau: f64| -> VppoError {
        let (dp, dq) = (f32s(p), f32s(q));
        KlDiv::new(tau, Device::Cuda(0))
            .unwrap()
            .forward_device(&vppo::DeviceKlBatch {
                p_logits: vppo::ByDtype::F32(&dp),
                q_logits: vppo::ByDtype::F32(&dq),
                vocab,
                p_rows: None,
                q_rows: None,
            })
            .expect_err("bad input must be an error")
    };
    let good = [0.0f32, 1.0, 2.0];
    let ninf = f32::NEG_INFINITY;
    let bad_rows: [(Vec<f32>, Vec<f32>, usize, f64); 6] = [
        (
            [good, [0.0, f32::NAN, 1.0]].concat(),
            [good, good].concat(),
            3,
            1.0,
        ),
        (
            [good, good].concat(),
            [good, [f32::INFINITY, 0.0, 0.0]].concat(),
            3,
            1.0,
        ),
        ([[ninf; 3], good].concat(), [good, good].concat(), 3, 1.0),
        (
            [good, [ninf, 1.0, 0.0]].concat(),
            [good, [0.0, 1.0, ninf]].concat(),
            3,
            1.0,
        ),
        (
            [good, [ninf, 1.0, 0.0]].concat(),
            [good, [0.0, 1.0, ninf]].concat(),
            3,
            0.5,
        ),
        (vec![0.0, 1e38, 0.0, 0.0], vec![0.0; 4], 2, 0.1),
    ];
    for (p, q, vocab, tau) in bad_rows {
        let host = forward_err(&p, &q, vocab, tau, Device::Cuda(0));
        let got = device_err(&p, &q, vocab, tau);
        // the same error, a NaN value compared as NaN
        assert_eq!(
            format!("{got:?}"),
            format!("{host:?}"),
            "{p:?} {q:?} tau={tau}"
        );
    }

    // Bad indices and shapes: the host path's error, and nothing launched (checked on the copy).
    let case = random_case(7, Dtype::F32, 5, 3, true);
    let (p, q) = (
        upload_logits(&theirs, &case.p),
        upload_logits(&theirs, &case.q),
    );
    let op = KlDiv::new(1.0, Device::Cuda(0)).unwrap();
    let decreasing: Vec<i64> = case
        .p_rows
        .as_ref()
        .unwrap()
        .iter()
        .rev()
        .copied()
        .collect();
    let dec = theirs.clone_htod(&decreasing).unwrap();
    let short = theirs.clone_htod(&decreasing[..2]).unwrap();
    for (p_rows, q_rows) in [(Some(&dec), None), (None, Some(&short))] {
        let db = vppo::DeviceKlBatch {
            p_logits: p.view(),
            q_logits: q.view(),
            vocab: 5,
            p_rows,
            q_rows,
        };
        let host_p: Option<Vec<i64>> = p_rows.map(|r| theirs.clone_dtoh(r).unwrap());
        let host_q: Option<Vec<i64>> = q_rows.map(|r| theirs.clone_dtoh(r).unwrap());
        let hb = KlBatch {
            p_rows: host_p.as_deref(),
            q_rows: host_q.as_deref(),
            ..case.batch()
        };
        let want = op.forward(&hb).unwrap_err();
        assert_eq!(op.forward_device(&db).unwrap_err(), want);
    }

    // The backward: bad saved values, grad_kl and gradients are refused before anything is written;
    // an overflow of the dtype is an error with both gradients zero.
    let case = random_case(3, Dtype::Bf16, 6, 3, false);
    let (p, q) = (
        upload_logits(&theirs, &case.p),
        upload_logits(&theirs, &case.q),
    );
    let db = vppo::DeviceKlBatch {
        p_logits: p.view(),
        q_logits: q.view(),
        vocab: 6,
        p_rows: None,
        q_rows: None,
    };
    let out = op.forward_device(&db).unwrap();
    let (kl, lse_p, lse_q) = (f32s(&out.kl), f32s(&out.lse_p), f32s(&out.lse_q));
    let lse_short = f32s(&out.lse_q[..2]);
    let saved = vppo::DeviceKlSaved {
        kl: &kl,
        lse_p: &lse_p,
        lse_q: &lse_q,
    };
    let nan_grads = || {
        (
            upload_logits(
                &theirs,
                &to_dtype(vec![f32::NAN; case.p.len()], Dtype::Bf16),
            ),
            upload_logits(
                &theirs,
                &to_dtype(vec![f32::NAN; case.q.len()], Dtype::Bf16),
            ),
        )
    };
    let untouched = |g: &vppo::tensor::DeviceTensor| {
        widened(&download_logits(&theirs, g))
            .iter()
            .all(|x| x.is_nan())
    };
    let (ok_u, nan_u, short_u) = (
        f32s(&[1.0; 3]),
        f32s(&[1.0, f32::NAN, 1.0]),
        f32s(&[1.0; 2]),
    );
    let short_saved = vppo::DeviceKlSaved {
        lse_q: &lse_short,
        ..saved
    };
    for (s, u, named) in [
        (
            &saved,
            &nan_u,
            "grad_kl has a non-finite value (NaN) at row 1",
        ),
        (&saved, &short_u, "grad_kl"),
        (&short_saved, &ok_u, "lse_q"),
    ] {
        let (mut gp, mut gq) = nan_grads();
        let e = op
            .backward_device(&db, s, u, gp.as_mut(), gq.as_mut())
            .unwrap_err();
        assert!(e.to_string().contains(named), "{named}: {e}");
        assert!(
            untouched(&gp) && untouched(&gq),
            "{named}: a gradient was written"
        );
    }
    let (_, mut gq) = nan_grads();
    let mut gp32 = upload_logits(&theirs, &zeros(case.p.len(), Dtype::F32));
    let e = op
        .backward_device(&db, &saved, &ok_u, gp32.as_mut(), gq.as_mut())
        .unwrap_err();
    assert!(e.to_string().contains("grad_p"), "{e}");
    assert!(untouched(&gq));
    let (mut gp, mut gq) = nan_grads();
    let huge = f32s(&[3e38; 3]);
    let e = op
        .backward_device(&db, &saved, &huge, gp.as_mut(), gq.as_mut())
        .unwrap_err();
    assert!(matches!(e, VppoError::Overflow { .. }), "{e}");
    for g in [&gp, &gq] {
        assert!(widened(&download_logits(&theirs, g))
            .iter()
            .all(|x| *x == 0.0));
    }
    // A KlDiv on another device refuses device buffers.
    let simt = KlDiv::new(1.0, Device::Reference).unwrap();
    assert!(simt
        .forward_device(&db)
        .unwrap_err()
        .to_string()
        .contains("Device::Cuda"));
    theirs.synchronize().unwrap();
}
