//! Issue 10, section 1: no safe public function touches memory outside its slices, whatever it is
//! given, and a backward never turns a non-finite value it reads from a forward's output into a
//! gradient.
//!
//! Each case was a segmentation fault (or a NaN gradient and Ok) on faaac07, where the pipeline's
//! entry points were safe `pub fn`s of `vppo::kernels` with the signatures `vppo::hooks` has now
//! and no checks of their own. Now every one returns an error naming the tensor.

use vppo::{
    hooks, Batch, Device, GradMut, LaneOrder, Location, Logits, Tensor, Vppo, VppoConfig,
    VppoError, VppoOutput,
};

const SIMT: Device = Device::Simt(LaneOrder::Forward);
const N: usize = 4;
const V: usize = 1024;

/// A valid batch of N = 4 tokens over V = 1024, two responses of two tokens.
struct Owned {
    logits: Vec<f32>,
    masked: Vec<f32>,
    targets: Vec<i32>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
    cu: Vec<i32>,
}

impl Owned {
    fn new() -> Owned {
        let logits: Vec<f32> = (0..N * V).map(|i| ((i * 37) % 101) as f32 / 50.0).collect();
        let masked: Vec<f32> = logits.iter().map(|x| 0.9 * x).collect();
        Owned {
            logits,
            masked,
            targets: vec![3, 70, 500, 1023],
            old_logp: vec![-7.0, -6.5, -7.2, -6.9],
            advantages: vec![1.0, -0.5],
            cu: vec![0, 2, 4],
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
            vocab: V,
            ..Default::default()
        }
    }

    /// The reference's forward output for the valid batch.
    fn out(&self) -> VppoOutput {
        Vppo::new(VppoConfig::default(), Device::Reference)
            .unwrap()
            .forward(&self.batch())
            .unwrap()
    }
}

fn assert_shape(e: VppoError, want: Tensor) {
    match e {
        VppoError::Shape { tensor, .. } if tensor == want => {}
        other => panic!("expected a shape error naming {want}, got {other:?}"),
    }
}

fn assert_non_finite(e: VppoError, want: Tensor, row: usize) {
    match e {
        VppoError::NonFinite {
            tensor, location, ..
        } if tensor == want && location == Location::Row(row) => {}
        other => panic!("expected a non-finite {want} at row {row}, got {other:?}"),
    }
}

#[test]
fn in_place_backward_with_an_overflowing_n_times_v() {
    // N * V = 4 * 2^62 wraps to 0 in release: faaac07 ran 2^62-element rows over an empty buffer.
    let vppo = Vppo::new(VppoConfig::default(), SIMT).unwrap();
    let out = Owned::new().out();
    for device in [SIMT, Device::Reference] {
        let vppo = Vppo::new(vppo.config().clone(), device).unwrap();
        let e = vppo
            .backward_in_place(GradMut::F32(&mut []), 1 << 62, &[0; 4], &out)
            .unwrap_err();
        assert_shape(e, Tensor::Logits);
    }
}

#[test]
fn pipeline_hooks_validate_the_batch() {
    let o = Owned::new();
    let cfg = VppoConfig::default();
    let short = &o.logits[..N * V - 1];
    let cases: [(Batch, fn(VppoError)); 4] = [
        (
            Batch {
                logits: Logits::F32(short),
                ..o.batch()
            },
            |e| assert_shape(e, Tensor::Logits),
        ),
        (
            Batch {
                logits_masked: Logits::F32(&o.masked[..16]),
                ..o.batch()
            },
            |e| assert_shape(e, Tensor::LogitsMasked),
        ),
        (
            Batch {
                cu_seqlens: &[0, 2, 40],
                ..o.batch()
            },
            |e| assert!(matches!(e, VppoError::CuSeqlens { .. }), "{e:?}"),
        ),
        (
            Batch {
                old_logp: &[],
                ..o.batch()
            },
            |e| assert_shape(e, Tensor::OldLogp),
        ),
    ];
    for (batch, check) in cases {
        check(hooks::forward(&batch, &cfg, SIMT).unwrap_err());
        check(hooks::perception(&batch, &cfg, SIMT).unwrap_err());
        check(hooks::mutant_perception(&batch, &cfg, LaneOrder::Reverse).unwrap_err());
        let mut grad = vec![0.0f32; N * V];
        check(
            hooks::backward_into(&batch, &cfg, &o.out(), GradMut::F32(&mut grad), SIMT)
                .unwrap_err(),
        );
    }
    // and the config: group-scope shaping over B = 2 responses and G = 3
    let cfg = VppoConfig {
        group_size: 3,
        shaping: vppo::Shaping::Linear,
        ..VppoConfig::default()
    };
    let e = hooks::forward(&o.batch(), &cfg, SIMT).unwrap_err();
    assert!(matches!(e, VppoError::GroupSize { .. }), "{e:?}");
}

#[test]
fn a_gradient_buffer_too_small_for_the_batch() {
    // 16 elements for a [4, 1024] gradient
    let o = Owned::new();
    let cfg = VppoConfig::default();
    let out = o.out();
    let mut grad = vec![0.0f32; 16];
    let e =
        hooks::backward_into(&o.batch(), &cfg, &out, GradMut::F32(&mut grad), SIMT).unwrap_err();
    assert_shape(e, Tensor::GradLogits);
    for device in [SIMT, Device::Reference] {
        let e = Vppo::new(cfg.clone(), device)
            .unwrap()
            .backward_into(&o.batch(), &out, GradMut::F32(&mut grad))
            .unwrap_err();
        assert_shape(e, Tensor::GradLogits);
    }
}

#[test]
fn a_forward_output_without_lse_or_dlogp() {
    let o = Owned::new();
    let cfg = VppoConfig::default();
    for (tensor, clear) in [
        (
            Tensor::Lse,
            (|out| out.tokens.lse.clear()) as fn(&mut VppoOutput),
        ),
        (Tensor::Dlogp, |out| out.tokens.dlogp.truncate(1)),
    ] {
        let mut out = o.out();
        clear(&mut out);
        let mut grad = vec![0.0f32; N * V];
        let e = hooks::backward_into(&o.batch(), &cfg, &out, GradMut::F32(&mut grad), SIMT)
            .unwrap_err();
        assert_shape(e, tensor);
        for device in [SIMT, Device::Reference] {
            let vppo = Vppo::new(cfg.clone(), device).unwrap();
            let e = vppo
                .backward_into(&o.batch(), &out, GradMut::F32(&mut grad))
                .unwrap_err();
            assert_shape(e, tensor);
            let mut logits = o.logits.clone();
            let e = vppo
                .backward_in_place(GradMut::F32(&mut logits), V, &o.targets, &out)
                .unwrap_err();
            assert_shape(e, tensor);
        }
    }
}

#[test]
fn a_non_finite_lse_or_dlogp_is_an_error_not_a_nan_gradient() {
    let o = Owned::new();
    let cfg = VppoConfig::default();
    for (tensor, value) in [
        (Tensor::Lse, f32::NAN),
        (Tensor::Lse, f32::INFINITY),
        (Tensor::Dlogp, f32::NAN),
        (Tensor::Dlogp, f32::NEG_INFINITY),
    ] {
        let mut out = o.out();
        let row = 2;
        match tensor {
            Tensor::Lse => out.tokens.lse[row] = value,
            _ => out.tokens.dlogp[row] = value,
        }
        for device in [SIMT, Device::Reference] {
            let vppo = Vppo::new(cfg.clone(), device).unwrap();
            let mut grad = vec![0.0f32; N * V];
            let e = vppo
                .backward_into(&o.batch(), &out, GradMut::F32(&mut grad))
                .unwrap_err();
            assert_non_finite(e, tensor, row);
            let mut logits = o.logits.clone();
            let e = vppo
                .backward_in_place(GradMut::F32(&mut logits), V, &o.targets, &out)
                .unwrap_err();
            assert_non_finite(e, tensor, row);
            assert_eq!(logits, o.logits, "nothing is written before the error");
        }
        let mut grad = vec![0.0f32; N * V];
        let e = hooks::backward_into(&o.batch(), &cfg, &out, GradMut::F32(&mut grad), SIMT)
            .unwrap_err();
        assert_non_finite(e, tensor, row);
    }
}

#[test]
fn in_place_backward_with_bad_targets_or_lengths() {
    let o = Owned::new();
    let out = o.out();
    for device in [SIMT, Device::Reference] {
        let vppo = Vppo::new(VppoConfig::default(), device).unwrap();
        let mut logits = o.logits.clone();
        let e = vppo
            .backward_in_place(GradMut::F32(&mut logits[..V]), V, &o.targets, &out)
            .unwrap_err();
        assert_shape(e, Tensor::Logits);
        let e = vppo
            .backward_in_place(GradMut::F32(&mut logits), V, &[0, 1, 2, V as i32], &out)
            .unwrap_err();
        assert!(
            matches!(e, VppoError::TargetOutOfRange { row: 3, .. }),
            "{e:?}"
        );
    }
}

#[test]
fn the_checked_pipeline_still_matches_the_api() {
    // The hooks give what the API gives on a valid batch.
    let o = Owned::new();
    let cfg = VppoConfig::default();
    let vppo = Vppo::new(cfg.clone(), SIMT).unwrap();
    let (out, grad) = vppo.loss_and_grad(&o.batch()).unwrap();
    assert_eq!(hooks::forward(&o.batch(), &cfg, SIMT).unwrap(), out);
    let mut hook_grad = vec![f32::NAN; N * V];
    hooks::backward_into(&o.batch(), &cfg, &out, GradMut::F32(&mut hook_grad), SIMT).unwrap();
    assert_eq!(hook_grad, grad);
}
