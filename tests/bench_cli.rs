//! `vppo bench` through the built binary, at small sizes: the report's shape, that the timed calls
//! computed the same loss as the library (and as `vppo loss`), and the errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vppo::bench::{parse_synthetic, synthetic_batch, SyntheticSpec};
use vppo::{Device, Dtype, Vppo, VppoConfig};

fn vppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args(args)
        .output()
        .expect("run vppo")
}

fn json_line(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn check_timing(t: &serde_json::Value, iters: usize) {
    let samples = t["samples_ms"].as_array().unwrap();
    assert_eq!(samples.len(), iters);
    let s: Vec<f64> = samples.iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(s.iter().all(|&x| x > 0.0 && x.is_finite()), "{s:?}");
    let min = s.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(t["min_ms"].as_f64().unwrap(), min);
    let median = t["median_ms"].as_f64().unwrap();
    assert!(median >= min && median <= s.iter().copied().fold(0.0, f64::max));
}

#[test]
fn synthetic_report_matches_the_library() {
    let out = vppo(&[
        "bench",
        "--synthetic",
        "37,53,5,bf16",
        "--seed",
        "11",
        "--warmup",
        "0",
        "--iters",
        "3",
        "--grad",
        "logits-dtype",
        "--top-fraction",
        "0.25",
        "--json",
    ]);
    let r = json_line(&out);
    assert_eq!(r["n_tokens"], 37);
    assert_eq!(r["n_responses"], 5);
    assert_eq!(r["vocab"], 53);
    assert_eq!(r["dtype"], "bf16");
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["grad"], "logits-dtype");
    assert_eq!(r["input_bytes"], 2 * 37 * 53 * 2);
    check_timing(&r["forward"], 3);
    check_timing(&r["forward_backward"], 3);
    // gradient in bf16: 37 * 53 * 2 bytes on top of the output vectors
    assert_eq!(
        r["model_extra_bytes_forward_backward"].as_u64().unwrap()
            - r["model_extra_bytes_forward"].as_u64().unwrap(),
        37 * 53 * 2
    );
    assert_eq!(r["includes_host_device_copies"], false);

    // The same batch and options through the library give the same loss.
    let spec = parse_synthetic("37,53,5,bf16").unwrap();
    let owned = synthetic_batch(&spec, 11).unwrap();
    let cfg = VppoConfig {
        top_fraction: 0.25,
        ..VppoConfig::default()
    };
    let lib = Vppo::new(cfg, Device::Reference)
        .unwrap()
        .forward(&owned.batch())
        .unwrap();
    assert_eq!(r["loss"].as_f64().unwrap(), lib.loss);
    // and the loss is not trivially 0: the batch is random
    assert!(lib.loss.abs() > 1e-6);
}

#[test]
fn file_input_matches_vppo_loss_and_grad_none_skips_backward() {
    let input = fixture("batch_f16.safetensors");
    let r = json_line(&vppo(&[
        "bench",
        "--input",
        input.to_str().unwrap(),
        "--iters",
        "2",
        "--grad",
        "none",
        "--json",
    ]));
    check_timing(&r["forward"], 2);
    assert!(r["forward_backward"].is_null());
    assert!(r["peak_extra_bytes_forward_backward"].is_null());
    assert!(r["load_ms"].as_f64().unwrap() >= 0.0);

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let l = json_line(&vppo(&[
        "loss",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]));
    assert_eq!(r["loss"], l["loss"]);
    assert_eq!(r["n_tokens"], l["n_tokens"]);

    // The text report (no --json) names the timings.
    let text = vppo(&["bench", "--input", input.to_str().unwrap(), "--iters", "1"]);
    assert!(text.status.success());
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(
        s.contains("forward:") && s.contains("forward + backward:"),
        "{s}"
    );
}

#[test]
fn synthetic_batches_are_valid_and_seeded() {
    let spec = SyntheticSpec {
        n_tokens: 23,
        vocab: 17,
        n_responses: 4,
        dtype: Dtype::F16,
    };
    let a = synthetic_batch(&spec, 3).unwrap();
    let b = synthetic_batch(&spec, 3).unwrap();
    let c = synthetic_batch(&spec, 4).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.logits, c.logits);
    assert_eq!(a.cu_seqlens, vec![0, 6, 12, 18, 23]);
    a.batch().validate_small(1, false).unwrap();
    // old_logp is near the row's logp, so the ratio is within exp(+-0.3) up to rounding
    let out = Vppo::new(VppoConfig::default(), Device::Reference)
        .unwrap()
        .forward(&a.batch())
        .unwrap();
    for (lp, old) in out.tokens.logp.iter().zip(&a.old_logp) {
        assert!((lp - old).abs() <= 0.31, "{lp} {old}");
    }
    // scores differ across tokens (eps varies per token)
    let s = &out.tokens.score;
    assert!(s.iter().any(|&x| (x - s[0]).abs() > 1e-3));
}

#[test]
fn bad_arguments_are_errors() {
    let fail = |args: &[&str], needle: &str| {
        let out = vppo(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    };
    fail(
        &["bench", "--synthetic", "8,5,2,bf16", "--iters", "0"],
        "iters",
    );
    fail(&["bench", "--synthetic", "8,5,2,f64"], "f64");
    fail(&["bench", "--synthetic", "8,5,0,f32"], "B must be");
    fail(&["bench", "--synthetic", "8,5,f32"], "N,V,B,DTYPE");
    fail(&["bench"], "--input");
    fail(
        &["bench", "--input", "/nonexistent/x.safetensors"],
        "cannot read",
    );
    // a config out of range is the crate's error
    fail(
        &["bench", "--synthetic", "8,5,2,f32", "--top-fraction", "1.5"],
        "top_fraction",
    );
}
