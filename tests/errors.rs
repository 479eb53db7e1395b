//! One test for every error of SPEC section 7 (the GPU ones are tested with the kernels), through the
//! public API, checking the variant names the tensor and the row or response.

#![allow(clippy::identity_op)] // row * V + column reads clearer as written

use half::bf16;
use vppo::reference::{perception, select, shaping};
use vppo::{
    grpo_advantages, Batch, Device, GradMut, Location, Logits, Perception, Shaping, Tensor,
    TopFraction, Vppo, VppoConfig, VppoError,
};

/// A valid batch: N = 4 tokens, V = 3, B = 2 responses of 3 and 1 tokens.
struct Owned {
    logits: Vec<f32>,
    masked: Vec<f32>,
    targets: Vec<i32>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
    cu: Vec<i32>,
    vocab: usize,
}

impl Owned {
    fn new() -> Owned {
        Owned {
            logits: vec![0.1, 0.2, 0.3, 1.0, -1.0, 0.0, 0.5, 0.5, 0.5, 2.0, 1.0, 0.0],
            masked: vec![0.0, 0.2, 0.1, 1.0, 0.0, 0.0, 0.5, 0.4, 0.5, 1.0, 1.0, 0.0],
            targets: vec![0, 1, 2, 0],
            old_logp: vec![-1.0, -2.0, -1.1, -0.5],
            advantages: vec![1.0, -1.0],
            cu: vec![0, 3, 4],
            vocab: 3,
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            logits: Logits::F32(&self.logits),
            logits_masked: Logits::F32(&self.masked),
            targets: &self.targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu,
            vocab: self.vocab,
            ..Default::default()
        }
    }

    /// The error of a forward with the default config on the reference.
    fn err(&self) -> VppoError {
        self.err_with(VppoConfig::default())
    }

    fn err_with(&self, cfg: VppoConfig) -> VppoError {
        let vppo = Vppo::new(cfg, Device::Reference).unwrap();
        let e = vppo.forward(&self.batch()).unwrap_err();
        // loss_and_grad reports the same error
        assert_eq!(
            vppo.loss_and_grad(&self.batch()).unwrap_err().to_string(),
            e.to_string()
        );
        e
    }
}

#[test]
fn the_valid_batch_is_valid() {
    let o = Owned::new();
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    vppo.loss_and_grad(&o.batch()).unwrap();
}

#[test]
fn nan_in_logits() {
    let mut o = Owned::new();
    o.logits[2 * 3 + 1] = f32::NAN;
    let e = o.err();
    assert!(
        matches!(
            e,
            VppoError::NonFinite {
                tensor: Tensor::Logits,
                location: Location::Row(2),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "logits has a non-finite value (NaN) at row 2"
    );
}

#[test]
fn pos_inf_in_logits() {
    let mut o = Owned::new();
    o.logits[3 * 3] = f32::INFINITY;
    let e = o.err();
    assert!(
        matches!(
            e,
            VppoError::NonFinite {
                tensor: Tensor::Logits,
                location: Location::Row(3),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn nan_or_inf_in_logits_masked() {
    let mut o = Owned::new();
    o.masked[1 * 3 + 2] = f32::NAN;
    let e = o.err();
    assert!(matches!(
        e,
        VppoError::NonFinite {
            tensor: Tensor::LogitsMasked,
            location: Location::Row(1),
            ..
        }
    ));
    let mut o = Owned::new();
    o.masked[0] = f32::INFINITY;
    let e = o.err();
    assert!(matches!(
        e,
        VppoError::NonFinite {
            tensor: Tensor::LogitsMasked,
            location: Location::Row(0),
            ..
        }
    ));
}

#[test]
fn nan_or_inf_in_old_logp() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut o = Owned::new();
        o.old_logp[3] = bad;
        let e = o.err();
        assert!(
            matches!(
                e,
                VppoError::NonFinite {
                    tensor: Tensor::OldLogp,
                    location: Location::Row(3),
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn nan_or_inf_in_advantages() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut o = Owned::new();
        o.advantages[1] = bad;
        let e = o.err();
        assert!(matches!(
            e,
            VppoError::NonFinite {
                tensor: Tensor::Advantages,
                location: Location::Response(1),
                ..
            }
        ));
        assert!(e.to_string().contains("advantages") && e.to_string().contains("response 1"));
    }
}

#[test]
fn logits_row_all_neg_inf() {
    let mut o = Owned::new();
    o.logits[3..6].fill(f32::NEG_INFINITY);
    assert_eq!(
        o.err(),
        VppoError::AllNegInf {
            tensor: Tensor::Logits,
            row: 1
        }
    );
}

#[test]
fn logits_masked_row_all_neg_inf() {
    let mut o = Owned::new();
    o.masked[9..12].fill(f32::NEG_INFINITY);
    assert_eq!(
        o.err(),
        VppoError::AllNegInf {
            tensor: Tensor::LogitsMasked,
            row: 3
        }
    );
}

#[test]
fn target_logit_neg_inf() {
    let mut o = Owned::new();
    o.logits[2 * 3 + 2] = f32::NEG_INFINITY; // targets[2] = 2
    assert_eq!(o.err(), VppoError::TargetNegInf { row: 2, target: 2 });
    // ... but logits_masked[t, y] = -inf is allowed: logp_masked = -inf, kl = +inf, score = clamp.
    let mut o = Owned::new();
    o.masked[2 * 3 + 2] = f32::NEG_INFINITY;
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    let out = vppo.forward(&o.batch()).unwrap();
    assert_eq!(out.tokens.logp_masked[2], f32::NEG_INFINITY);
    assert_eq!(out.tokens.kl[2], f32::INFINITY);
    assert_eq!(out.tokens.score[2], 10.0);
    assert!(out.loss.is_finite());
}

#[test]
fn target_out_of_range() {
    for bad in [-1, 3, i32::MAX, i32::MIN] {
        let mut o = Owned::new();
        o.targets[1] = bad;
        assert_eq!(
            o.err(),
            VppoError::TargetOutOfRange {
                row: 1,
                target: bad,
                vocab: 3
            }
        );
    }
}

#[test]
fn the_first_bad_row_is_reported_in_the_kernel_order() {
    // Row 3 has a NaN in logits, row 1 a target of -inf logit: row 1 is reported.
    let mut o = Owned::new();
    o.logits[3 * 3 + 1] = f32::NAN;
    o.logits[1 * 3 + 1] = f32::NEG_INFINITY;
    assert_eq!(o.err(), VppoError::TargetNegInf { row: 1, target: 1 });
    // Within a row: a NaN in logits comes before a bad logits_masked row (codes 2 < 6).
    let mut o = Owned::new();
    o.logits[0] = f32::NAN;
    o.masked[0..3].fill(f32::NEG_INFINITY);
    let cfg = VppoConfig::default();
    let e = perception::perception(&o.batch(), &cfg).unwrap_err();
    assert!(matches!(
        e,
        VppoError::NonFinite {
            tensor: Tensor::Logits,
            location: Location::Row(0),
            ..
        }
    ));
    // An all -inf logits row is reported as such, not as its target being -inf (codes 3 < 4).
    let mut o = Owned::new();
    o.logits[0..3].fill(f32::NEG_INFINITY);
    assert_eq!(
        perception::perception(&o.batch(), &cfg).unwrap_err(),
        VppoError::AllNegInf {
            tensor: Tensor::Logits,
            row: 0
        }
    );
}

#[test]
fn shapes_that_do_not_agree() {
    let shape_of = |e: VppoError| match e {
        VppoError::Shape { tensor, .. } => tensor,
        other => panic!("expected a shape error, got {other}"),
    };
    let mut o = Owned::new();
    o.logits.pop();
    assert_eq!(shape_of(o.err()), Tensor::Logits);
    let mut o = Owned::new();
    o.masked.push(0.0);
    assert_eq!(shape_of(o.err()), Tensor::LogitsMasked);
    let mut o = Owned::new();
    o.old_logp.pop();
    assert_eq!(shape_of(o.err()), Tensor::OldLogp);
    let mut o = Owned::new();
    o.advantages.push(0.0); // B = 3 but cu_seqlens has 3 entries
    assert_eq!(shape_of(o.err()), Tensor::CuSeqlens);
    let mut o = Owned::new();
    o.vocab = 0;
    assert_eq!(shape_of(o.err()), Tensor::Logits);
    // logits_masked in another dtype than logits
    let o = Owned::new();
    let masked_bf16: Vec<bf16> = o.masked.iter().map(|&x| bf16::from_f32(x)).collect();
    let b = Batch {
        logits_masked: Logits::Bf16(&masked_bf16),
        ..o.batch()
    };
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    assert_eq!(
        shape_of(vppo.forward(&b).unwrap_err()),
        Tensor::LogitsMasked
    );
}

#[test]
fn gradient_buffer_of_the_wrong_size_or_dtype() {
    let o = Owned::new();
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    let out = vppo.forward(&o.batch()).unwrap();
    let mut small = vec![0.0f32; 11];
    let e = vppo
        .backward_into(&o.batch(), &out, GradMut::F32(&mut small))
        .unwrap_err();
    assert!(matches!(
        e,
        VppoError::Shape {
            tensor: Tensor::GradLogits,
            ..
        }
    ));
    let mut wrong_dtype = vec![bf16::ZERO; 12]; // logits are f32: a bf16 gradient is refused
    let e = vppo
        .backward_into(&o.batch(), &out, GradMut::Bf16(&mut wrong_dtype))
        .unwrap_err();
    assert!(matches!(
        e,
        VppoError::Shape {
            tensor: Tensor::GradLogits,
            ..
        }
    ));
    // an output of another batch
    let mut grad = vec![0.0f32; 12];
    let other = vppo
        .forward(&Batch {
            cu_seqlens: &[0, 4],
            advantages: &[1.0],
            ..o.batch()
        })
        .unwrap();
    assert!(vppo
        .backward_into(&o.batch(), &other, GradMut::F32(&mut grad))
        .is_err());
}

#[test]
fn cu_seqlens_malformed() {
    for (cu, what) in [
        (vec![1, 3, 4], "starts at 1"),
        (vec![0, 3, 2], "decreases"),
        (vec![0, 3, 5], "ends at 5"),
        (vec![0, 3, 3], "ends at 3"),
    ] {
        let mut o = Owned::new();
        o.cu = cu;
        let e = o.err();
        assert!(matches!(e, VppoError::CuSeqlens { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    // The stage functions check it too.
    let f = TopFraction::new(0.4).unwrap();
    assert!(select::topk_mask(&[0.0; 3], &[0, 4], f).is_err());
    assert!(shaping::sbar(&[0.0; 3], &[0, 2, 1]).is_err());
}

#[test]
fn responses_not_a_whole_number_of_groups() {
    // B = 2, G = 3, with group-scope shaping (the paper's linear variant): an error.
    let o = Owned::new();
    let e = o.err_with(VppoConfig::paper(3));
    assert_eq!(
        e,
        VppoError::GroupSize {
            tensor: Tensor::Advantages,
            n_responses: 2,
            group_size: 3
        }
    );
    // With batch-scope shaping G is not needed, so it is no error.
    let cfg = VppoConfig {
        group_size: 3,
        ..VppoConfig::default()
    };
    Vppo::new(cfg, Device::Reference)
        .unwrap()
        .forward(&o.batch())
        .unwrap();
    // Nor with no shaping in a group scope.
    let cfg = VppoConfig {
        shaping: Shaping::None,
        ..VppoConfig::paper(3)
    };
    Vppo::new(cfg, Device::Reference)
        .unwrap()
        .forward(&o.batch())
        .unwrap();
    // GRPO advantages need G.
    assert_eq!(
        grpo_advantages(&[1.0, 2.0, 3.0], 2).unwrap_err(),
        VppoError::GroupSize {
            tensor: Tensor::Rewards,
            n_responses: 3,
            group_size: 2
        }
    );
    assert!(matches!(
        grpo_advantages(&[1.0], 0).unwrap_err(),
        VppoError::Config { .. }
    ));
}

#[test]
fn grpo_reward_not_finite() {
    let e = grpo_advantages(&[1.0, f32::NAN, 0.0, 1.0], 2).unwrap_err();
    assert!(matches!(
        e,
        VppoError::NonFinite {
            tensor: Tensor::Rewards,
            location: Location::Response(1),
            ..
        }
    ));
    assert!(grpo_advantages(&[f32::INFINITY, 0.0], 2).is_err());
}

#[test]
fn config_out_of_range() {
    let d = VppoConfig::default;
    let cases: Vec<(VppoConfig, &str)> = vec![
        (
            VppoConfig {
                top_fraction: 0.0,
                ..d()
            },
            "top-fraction",
        ),
        (
            VppoConfig {
                top_fraction: 1.01,
                ..d()
            },
            "top-fraction",
        ),
        (
            VppoConfig {
                top_fraction: f64::NAN,
                ..d()
            },
            "top-fraction",
        ),
        (
            VppoConfig {
                eps_low: -0.1,
                ..d()
            },
            "eps-low",
        ),
        (
            VppoConfig {
                eps_high: -1e-9,
                ..d()
            },
            "eps-high",
        ),
        (
            VppoConfig {
                dual_clip: Some(1.0),
                ..d()
            },
            "dual-clip",
        ),
        (
            VppoConfig {
                dual_clip: Some(0.5),
                ..d()
            },
            "dual-clip",
        ),
        (
            VppoConfig {
                temperature: 0.0,
                ..d()
            },
            "temperature",
        ),
        (
            VppoConfig {
                temperature: -1.0,
                ..d()
            },
            "temperature",
        ),
        (
            VppoConfig {
                beta_min: -0.1,
                ..d()
            },
            "beta-min",
        ),
        (
            VppoConfig {
                beta_min: 1.5,
                ..d()
            },
            "beta-min",
        ),
        (
            VppoConfig {
                beta_max: 0.8,
                ..d()
            },
            "beta-max",
        ),
        (
            VppoConfig {
                group_size: 0,
                ..d()
            },
            "group-size",
        ),
        (
            VppoConfig {
                score_clamp: 0.0,
                ..d()
            },
            "score-clamp",
        ),
        (
            VppoConfig {
                token_normalizer: Some(0.0),
                ..d()
            },
            "token-normalizer",
        ),
        (
            VppoConfig {
                response_normalizer: Some(f64::NAN),
                ..d()
            },
            "response-normalizer",
        ),
        (
            VppoConfig {
                tas_range: Some((1.0, 0.0)),
                ..d()
            },
            "tas-range",
        ),
    ];
    for (cfg, field) in cases {
        let e = Vppo::new(cfg.clone(), Device::Reference).unwrap_err();
        assert!(
            matches!(e, VppoError::Config { field: f, .. } if f == field),
            "{field}: {e}"
        );
        // The reference entry point validates too.
        assert!(vppo::reference::forward(&Owned::new().batch(), &cfg).is_err());
    }
    // The edges that are allowed: top_fraction = 1, eps = 0, beta_min 0 and 1, beta_max = beta_min.
    for cfg in [
        VppoConfig {
            top_fraction: 1.0,
            eps_low: 0.0,
            eps_high: 0.0,
            ..d()
        },
        VppoConfig {
            beta_min: 0.0,
            ..d()
        },
        VppoConfig {
            beta_min: 1.0,
            beta_max: 1.0,
            ..d()
        },
    ] {
        Vppo::new(cfg, Device::Reference).unwrap();
    }
}

#[test]
fn kernel_devices_report_errors_not_panics() {
    // Validation runs before dispatch on every device: a bad batch gives its own error there too.
    let mut o = Owned::new();
    o.targets[0] = 7;
    for device in [Device::Cuda(0), Device::Simt(vppo::LaneOrder::Forward)] {
        let vppo = match Vppo::new(VppoConfig::default(), device) {
            Ok(v) => v,
            // no GPU here: the GPU errors are tested in `gpu_unavailable_is_a_clear_error`
            Err(VppoError::KernelsNotBuilt | VppoError::NoCudaDriver | VppoError::NoGpu(_)) => {
                continue
            }
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(
            vppo.forward(&o.batch()).unwrap_err(),
            VppoError::TargetOutOfRange { row: 0, .. }
        ));
    }
}

/// SPEC 7: asking for the GPU without kernels, driver or device is an error, never a panic. Which one
/// depends on the machine: a build without nvcc says "kernels not built"; with kernels but no libcuda,
/// "no CUDA driver"; with a driver but no device, "no GPU".
#[test]
fn gpu_unavailable_is_a_clear_error() {
    let r = Vppo::new(VppoConfig::default(), Device::Cuda(0));
    if !vppo::cuda::kernels_built() {
        assert!(matches!(r, Err(VppoError::KernelsNotBuilt)), "{r:?}");
        assert!(r.unwrap_err().to_string().contains("kernels not built"));
        return;
    }
    match r {
        Ok(_) => {
            // a real GPU: an ordinal past the last device is NoGpu
            let e = Vppo::new(VppoConfig::default(), Device::Cuda(4096)).unwrap_err();
            assert!(matches!(e, VppoError::NoGpu(_)), "{e}");
        }
        Err(e) => assert!(
            matches!(e, VppoError::NoCudaDriver | VppoError::NoGpu(_)),
            "{e}"
        ),
    }
}

/// The devices every check below runs on: the reference and the SIMT executor (the kernel sources).
fn host_devices() -> [Device; 2] {
    [Device::Reference, Device::Simt(vppo::LaneOrder::Forward)]
}

#[test]
fn temperature_whose_inverse_is_not_an_f32_is_a_config_error() {
    for tau in [5e-324, 1e-40, 4e-39, 1e38, 1e300] {
        let cfg = VppoConfig {
            temperature: tau,
            ..VppoConfig::default()
        };
        let e = Vppo::new(cfg, Device::Reference).unwrap_err();
        assert!(
            matches!(
                e,
                VppoError::Config {
                    field: "temperature",
                    ..
                }
            ),
            "{tau}: {e}"
        );
    }
    // The smallest and largest accepted still run.
    for tau in [5e-39, 8e37] {
        let cfg = VppoConfig {
            temperature: tau,
            ..VppoConfig::default()
        };
        Vppo::new(cfg, Device::Reference).unwrap();
    }
}

#[test]
fn a_logit_that_overflows_f32_when_divided_by_the_temperature_is_named() {
    // tau = 1e-38: 1/tau is 1e38 (an f32), but 10 / tau is 1e39. Before, simt returned loss inf and a
    // NaN gradient, and the reference wrote NaN outputs.
    let mut o = Owned::new();
    o.masked[2 * 3 + 1] = 10.0;
    let cfg = VppoConfig {
        temperature: 1e-38,
        ..VppoConfig::default()
    };
    for device in host_devices() {
        let vppo = Vppo::new(cfg.clone(), device).unwrap();
        let e = vppo.forward(&o.batch()).unwrap_err();
        assert!(
            matches!(
                e,
                VppoError::TemperatureOverflow {
                    tensor: Tensor::LogitsMasked,
                    row: 2,
                    value,
                    ..
                } if value == 10.0
            ),
            "{device:?}: {e}"
        );
        assert!(e.to_string().contains("temperature"), "{e}");
        assert_eq!(
            vppo.loss_and_grad(&o.batch()).unwrap_err().to_string(),
            e.to_string()
        );
    }
}

#[test]
fn outputs_that_overflow_are_errors_naming_them() {
    let o = Owned::new();
    let cases = [
        (
            VppoConfig {
                token_normalizer: Some(1e-300),
                ..VppoConfig::default()
            },
            "loss",
        ),
        (
            VppoConfig {
                logp_penalty: 1e308,
                ..VppoConfig::default()
            },
            "loss",
        ),
        (
            VppoConfig {
                logp_penalty: -1e308,
                ..VppoConfig::default()
            },
            "loss",
        ),
    ];
    for (cfg, what) in cases {
        for device in host_devices() {
            let vppo = Vppo::new(cfg.clone(), device).unwrap();
            let e = vppo.forward(&o.batch()).unwrap_err();
            assert!(
                matches!(&e, VppoError::Overflow { what: w, .. } if *w == what),
                "{device:?} {cfg:?}: {e}"
            );
            assert!(e.to_string().starts_with("overflow: loss"), "{e}");
        }
    }
    // A finite dloss/dlogp whose quotient by the temperature overflows f32 would overflow the
    // gradient: refused before anything is written, naming grad_logits and the row.
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    let mut out = vppo.forward(&o.batch()).unwrap();
    out.tokens.dlogp[1] = 3e38;
    let tiny = Vppo::new(
        VppoConfig {
            temperature: 0.5,
            ..VppoConfig::default()
        },
        Device::Reference,
    )
    .unwrap();
    let mut grad = vec![7.0f32; 12];
    let e = tiny
        .backward_into(&o.batch(), &out, GradMut::F32(&mut grad))
        .unwrap_err();
    assert!(
        matches!(
            e,
            VppoError::Overflow {
                what: "grad_logits",
                location: Some(Location::Row(1)),
                ..
            }
        ),
        "{e}"
    );
    assert!(grad.iter().all(|&g| g == 7.0), "nothing written");
}

/// One V = 4096 row of zeros with a single logit of 1e38, in logits, in logits_masked, or in both:
/// valid and finite. The kernels' online softmax formed (m_a - m) * s_a before the scale
/// 2^((m_a - m) k) underflowed to 0 and refused it as "finite logits so far apart"; with the huge
/// logit in logits_masked only, f_b = sum_v e_v (b_v - m_b) (about -V 1e38) overflowed f32 while kl
/// (about 1e38) does not, and the row was refused as well. Now such a row takes the kernel's cold
/// path (f_b in double) and the SIMT executor agrees with the reference.
#[test]
fn one_huge_logit_in_a_long_row_is_not_refused() {
    let v = 4096;
    for (huge_a, huge_b) in [(true, true), (true, false), (false, true)] {
        let mut logits = vec![0.0f32; 2 * v];
        if huge_a {
            logits[3000] = 1e38; // row 0, the target's row
            logits[v + 17] = 1e38; // row 1, not the target
        }
        let mut masked = vec![0.5f32; 2 * v];
        if huge_b {
            masked[3000] = 1e38;
            masked[v + 17] = 1e38;
        }
        let targets = [3000, 5];
        let batch = Batch {
            logits: Logits::F32(&logits),
            logits_masked: Logits::F32(&masked),
            targets: &targets,
            old_logp: &[-0.1, -2.0],
            advantages: &[1.0],
            cu_seqlens: &[0, 2],
            vocab: v,
            ..Default::default()
        };
        let case = format!("huge in logits {huge_a}, in logits_masked {huge_b}");
        for perception in [Perception::FullKl, Perception::K3] {
            let cfg = VppoConfig {
                perception,
                ..VppoConfig::default()
            };
            let want = Vppo::new(cfg.clone(), Device::Reference)
                .unwrap()
                .forward(&batch)
                .unwrap_or_else(|e| panic!("reference, {case}: {e}"));
            for device in [
                Device::Simt(vppo::LaneOrder::Forward),
                Device::Simt(vppo::LaneOrder::Reverse),
            ] {
                let got = Vppo::new(cfg.clone(), device)
                    .unwrap()
                    .forward(&batch)
                    .unwrap_or_else(|e| panic!("{device:?}, {case}: {e}"));
                if huge_a {
                    assert_eq!(got.tokens.logp[0], 0.0);
                }
                // logp of row 1 is -1e38 with the huge logit in logits; kl about 1e38 when only one
                // row has it: each equal to f32 rounding
                let close = |g: f32, w: f32| (g - w).abs() <= 1e-6 * w.abs().max(1.0);
                for t in 0..2 {
                    let (g, w) = (got.tokens.logp[t], want.tokens.logp[t]);
                    assert!(close(g, w), "{case}: logp {t}: {g} vs {w}");
                    let (g, w) = (got.tokens.kl[t], want.tokens.kl[t]);
                    assert!(close(g, w), "{case}: kl {t}: {g} vs {w}");
                    assert_eq!(
                        got.tokens.score[t], want.tokens.score[t],
                        "{case}: score {t}"
                    );
                }
                assert!((got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0));
            }
        }
    }
}

/// Finite rows whose spread the kernels' f32 sums cannot hold are an error naming the tensor and
/// the row (it was a `Kernel` error naming neither tensor).
#[test]
fn a_row_the_kernels_cannot_hold_names_its_tensor_and_row() {
    let mut o = Owned::new();
    o.masked[3 * 3 + 0] = -3e38;
    o.masked[3 * 3 + 1] = 3e38;
    let vppo = Vppo::new(
        VppoConfig::default(),
        Device::Simt(vppo::LaneOrder::Forward),
    )
    .unwrap();
    let e = vppo.forward(&o.batch()).unwrap_err();
    assert!(
        matches!(
            e,
            VppoError::RowOverflow {
                tensor: Tensor::LogitsMasked,
                row: 3
            }
        ),
        "{e}"
    );
}

/// SPEC 12: a KL penalty without ref_logp is an error naming the missing tensor and the penalty; a
/// ref_logp of the wrong length, or with a NaN or an inf, names ref_logp (and the row); a ref_logp
/// given with no KL penalty is still checked, and otherwise changes nothing. On every host device.
#[test]
fn kl_penalty_needs_a_valid_ref_logp() {
    use vppo::KlPenalty;
    let o = Owned::new();
    let good = [-1.2f32, -0.4, -2.0, -0.7];
    for device in host_devices() {
        for penalty in [KlPenalty::K1, KlPenalty::Abs, KlPenalty::Mse, KlPenalty::K3] {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                ..VppoConfig::default()
            };
            let vppo = Vppo::new(cfg, device).unwrap();
            let e = vppo.forward(&o.batch()).unwrap_err();
            assert!(
                matches!(
                    e,
                    VppoError::MissingTensor {
                        tensor: Tensor::RefLogp,
                        ..
                    }
                ),
                "{device:?} {penalty:?}: {e}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "ref_logp is missing: kl_penalty = {} needs the reference policy's log-prob \
                     of each target ([N] f32)",
                    penalty.name()
                )
            );
            assert_eq!(
                vppo.loss_and_grad(&o.batch()).unwrap_err().to_string(),
                e.to_string()
            );
            let short = [-1.0f32; 3];
            let e = vppo
                .forward(&Batch {
                    ref_logp: Some(&short),
                    ..o.batch()
                })
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    VppoError::Shape {
                        tensor: Tensor::RefLogp,
                        ..
                    }
                ),
                "{device:?}: {e}"
            );
            assert!(
                e.to_string().contains("has 3 elements, expected N = 4"),
                "{e}"
            );
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut r = good;
                r[2] = bad;
                let e = vppo
                    .forward(&Batch {
                        ref_logp: Some(&r),
                        ..o.batch()
                    })
                    .unwrap_err();
                assert!(
                    matches!(
                        e,
                        VppoError::NonFinite {
                            tensor: Tensor::RefLogp,
                            location: Location::Row(2),
                            ..
                        }
                    ),
                    "{device:?} {bad}: {e}"
                );
            }
            assert!(vppo
                .forward(&Batch {
                    ref_logp: Some(&good),
                    ..o.batch()
                })
                .is_ok());
        }
        // No KL penalty: a bad ref_logp is still refused, a good one is ignored.
        let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
        let mut r = good;
        r[1] = f32::NAN;
        let e = vppo
            .forward(&Batch {
                ref_logp: Some(&r),
                ..o.batch()
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                VppoError::NonFinite {
                    tensor: Tensor::RefLogp,
                    location: Location::Row(1),
                    ..
                }
            ),
            "{device:?}: {e}"
        );
        let with = vppo
            .forward(&Batch {
                ref_logp: Some(&good),
                ..o.batch()
            })
            .unwrap();
        assert_eq!(with, vppo.forward(&o.batch()).unwrap(), "{device:?}");
    }
}

/// SPEC 12: kl_coef (beta) must be finite and >= 0, whatever the penalty.
#[test]
fn kl_coef_out_of_range_is_a_config_error() {
    for beta in [-1e-3, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for penalty in [vppo::KlPenalty::None, vppo::KlPenalty::K3] {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                kl_coef: beta,
                ..VppoConfig::default()
            };
            let e = Vppo::new(cfg, Device::Reference).unwrap_err();
            assert!(
                matches!(
                    e,
                    VppoError::Config {
                        field: "kl-coef",
                        ..
                    }
                ),
                "{beta}: {e}"
            );
            assert!(e.to_string().contains("a finite value >= 0"), "{e}");
        }
    }
    // 0 is allowed (the term is computed and weighs nothing)
    let cfg = VppoConfig {
        kl_coef: 0.0,
        ..VppoConfig::default()
    };
    assert!(Vppo::new(cfg, Device::Reference).is_ok());
}
