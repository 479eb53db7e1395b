//! `vppo loss` through the built binary, on a file written by another program (NumPy and the Python
//! safetensors package: scripts/make_fixture.py wrote tests/fixtures/ once), whose expected outputs
//! were computed by an independent NumPy implementation of the SPEC.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use vppo::{Device, Vppo, VppoConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn vppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args(args)
        .output()
        .expect("run vppo")
}

fn loss_cmd(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "loss",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    vppo(&args)
}

/// Every tensor of a safetensors file as f64 values, with its dtype and shape.
fn read_all(path: &Path) -> HashMap<String, (StDtype, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let d = view.data();
            let values: Vec<f64> = match view.dtype() {
                StDtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                StDtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                StDtype::I32 => d
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                StDtype::U8 => d.iter().map(|&x| x as f64).collect(),
                StDtype::F16 => d
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.dtype(), view.shape().to_vec(), values))
        })
        .collect()
}

fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn loss_matches_the_numpy_implementation() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let out = loss_cmd(&fixture("batch_f16.safetensors"), &out_path, &[]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    let got = read_all(&out_path);
    let want = read_all(&fixture("expected_f16.safetensors"));
    let (n, v, b) = (13usize, 11usize, 4usize);

    // Names, dtypes and shapes of SPEC section 9.
    for (name, dtype, shape) in [
        ("loss", StDtype::F32, vec![1]),
        ("score", StDtype::F32, vec![n]),
        ("kl", StDtype::F32, vec![n]),
        ("k3", StDtype::F32, vec![n]),
        ("entropy", StDtype::F32, vec![n]),
        ("logp", StDtype::F32, vec![n]),
        ("mask", StDtype::U8, vec![n]),
        ("sbar", StDtype::F32, vec![b]),
        ("alpha", StDtype::F32, vec![b]),
        ("grad_logits", StDtype::F32, vec![n, v]),
    ] {
        let (d, sh, _) = &got[name];
        assert_eq!((*d, sh.clone()), (dtype, shape), "{name}");
    }

    // Values: the f32 outputs against NumPy's f64 ones.
    let loss = want["loss"].2[0];
    assert!(
        (s["loss"].as_f64().unwrap() - loss).abs() <= 1e-12 * (1.0 + loss.abs()),
        "{s}"
    );
    assert!((got["loss"].2[0] - loss).abs() <= 1e-6 * (1.0 + loss.abs()));
    assert!((s["pg_loss"].as_f64().unwrap() - want["pg_loss"].2[0]).abs() <= 1e-12);
    assert_eq!(got["mask"].2, want["mask"].2);
    for name in [
        "score",
        "kl",
        "k3",
        "entropy",
        "logp",
        "sbar",
        "alpha",
        "grad_logits",
    ] {
        for (i, (g, w)) in got[name].2.iter().zip(&want[name].2).enumerate() {
            let ok = g == w || (g - w).abs() <= 1e-6 * (1.0 + w.abs());
            assert!(ok, "{name}[{i}]: vppo {g}, numpy {w}");
        }
    }
    // The fixture's -inf in logits_masked at a target: kl = +inf, score = 10.
    assert_eq!(got["kl"].2[3], f64::INFINITY);
    assert_eq!(got["score"].2[3], 10.0);
    assert_eq!(s["n_tokens"], 13);
    assert_eq!(s["n_responses"], 4);
    assert_eq!(s["device"], "cpu");
    assert_eq!(s["dtype"], "f16");
    for key in ["clip_fraction", "mean_ratio", "selected_fraction"] {
        assert!(s[key].is_number(), "{key} in {s}");
    }
    // 6 of 13 tokens are selected: ceil(0.4 * 5) + 0 + ceil(0.4 * 1) + ceil(0.4 * 7) = 2 + 1 + 3.
    assert!((s["selected_fraction"].as_f64().unwrap() - 6.0 / 13.0).abs() < 1e-15);
}

#[test]
fn options_reach_the_loss() {
    // Every option changed from its default; the loss equals the library's with the same config.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let extra = [
        "--group-size",
        "2",
        "--perception",
        "k3",
        "--score-clamp",
        "5",
        "--top-fraction",
        "0.7",
        "--shaping",
        "linear",
        "--beta-min",
        "0.8",
        "--beta-max",
        "1.3",
        "--tas-scope",
        "group",
        "--eps-low",
        "0.1",
        "--eps-high",
        "0.2",
        "--dual-clip",
        "none",
        "--aggregation",
        "seq-mean-token-mean",
        "--token-normalizer",
        "40",
        "--response-normalizer",
        "7",
        "--logp-penalty",
        "0.1",
        "--temperature",
        "0.9",
        "--loss-type",
        "gspo-token",
        "--mask-by",
        "perception-or-entropy",
        "--entropy-top-fraction",
        "0.3",
        "--kl-penalty",
        "none",
        "--kl-coef",
        "0.5",
        "--device",
        "cpu",
    ];
    let out = loss_cmd(&fixture("batch_f16.safetensors"), &out_path, &extra);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = VppoConfig {
        group_size: 2,
        perception: vppo::Perception::K3,
        score_clamp: 5.0,
        top_fraction: 0.7,
        shaping: vppo::Shaping::Linear,
        beta_min: 0.8,
        beta_max: 1.3,
        tas_scope: Some(vppo::TasScope::Group),
        tas_range: None,
        eps_low: 0.1,
        eps_high: 0.2,
        dual_clip: None,
        aggregation: vppo::Aggregation::SeqMeanTokenMean,
        token_normalizer: Some(40.0),
        response_normalizer: Some(7.0),
        logp_penalty: 0.1,
        temperature: 0.9,
        loss_type: vppo::LossType::GspoToken,
        mask_by: vppo::MaskBy::PerceptionOrEntropy,
        entropy_top_fraction: 0.3,
        kl_penalty: vppo::KlPenalty::None,
        kl_coef: 0.5,
    };
    let owned = vppo::io::read_batch(&fixture("batch_f16.safetensors")).unwrap();
    let want = Vppo::new(cfg.clone(), Device::Reference)
        .unwrap()
        .forward(&owned.batch())
        .unwrap();
    let default = Vppo::new(VppoConfig::default(), Device::Reference)
        .unwrap()
        .forward(&owned.batch())
        .unwrap();
    let s = summary(&out);
    assert_eq!(s["loss"].as_f64().unwrap(), want.loss);
    assert_eq!(s["token_normalizer"].as_f64().unwrap(), 40.0);
    assert_ne!(want.loss, default.loss);
    // A dual clip of 1.1 given alone reaches the loss too.
    let out2 = loss_cmd(
        &fixture("batch_f16.safetensors"),
        &out_path,
        &["--dual-clip", "1.1"],
    );
    assert!(out2.status.success());
    let cfg2 = VppoConfig {
        dual_clip: Some(1.1),
        ..VppoConfig::default()
    };
    let want2 = Vppo::new(cfg2, Device::Reference)
        .unwrap()
        .forward(&owned.batch())
        .unwrap();
    assert_eq!(summary(&out2)["loss"].as_f64().unwrap(), want2.loss);
}

fn assert_fails_without_output(out: &Output, out_path: &Path, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "stderr `{stderr}` lacks `{needle}`"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!out_path.exists(), "the output file was written");
    // no temporary left behind either
    let dir = out_path.parent().unwrap();
    assert_eq!(
        std::fs::read_dir(dir).unwrap().count(),
        0,
        "files left in {}",
        dir.display()
    );
}

/// Writes a copy of the fixture with one tensor replaced (or removed with `None`).
fn edited_fixture(
    dir: &Path,
    name: &str,
    replace: Option<(StDtype, Vec<usize>, Vec<u8>)>,
) -> PathBuf {
    let bytes = std::fs::read(fixture("batch_f16.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    if let Some((d, s, data)) = replace {
        owned.push((name.to_string(), d, s, data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, data)| (n.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    let path = dir.join(format!("edited_{name}.safetensors"));
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    path
}

#[test]
fn bad_inputs_fail_cleanly() {
    let inputs = tempfile::tempdir().unwrap();
    let run = |input: &Path, extra: &[&str], needle: &str| {
        let outdir = tempfile::tempdir().unwrap();
        let out_path = outdir.path().join("out.safetensors");
        let out = loss_cmd(input, &out_path, extra);
        assert_fails_without_output(&out, &out_path, needle);
    };
    // A NaN in logits row 2 (f16 NaN is 0x7e00).
    let bytes = std::fs::read(fixture("batch_f16.safetensors")).unwrap();
    let mut data = SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensor("logits")
        .unwrap()
        .data()
        .to_vec();
    data[(2 * 11 + 4) * 2..(2 * 11 + 4) * 2 + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    let nan = edited_fixture(
        inputs.path(),
        "logits",
        Some((StDtype::F16, vec![13, 11], data)),
    );
    run(&nan, &[], "logits has a non-finite value (NaN) at row 2");
    // A missing tensor.
    let missing = edited_fixture(inputs.path(), "old_logp", None);
    run(&missing, &[], "old_logp");
    // A tensor of the wrong dtype.
    let wrong = edited_fixture(
        inputs.path(),
        "advantages",
        Some((StDtype::F64, vec![4], vec![0u8; 32])),
    );
    run(&wrong, &[], "advantages");
    // A target out of range.
    let mut t = vec![0u8; 13 * 4];
    t[0..4].copy_from_slice(&11i32.to_le_bytes());
    let target = edited_fixture(inputs.path(), "targets", Some((StDtype::I32, vec![13], t)));
    run(&target, &[], "targets row 0");
    // cu_seqlens not ending at N.
    let cu: Vec<u8> = [0i32, 5, 5, 6, 12]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let cu = edited_fixture(
        inputs.path(),
        "cu_seqlens",
        Some((StDtype::I32, vec![5], cu)),
    );
    run(&cu, &[], "cu_seqlens");
    // B = 4 is not a whole number of groups of 3 for group-scope shaping.
    run(
        &fixture("batch_f16.safetensors"),
        &["--group-size", "3", "--shaping", "linear"],
        "groups of 3",
    );
    // Config errors.
    run(
        &fixture("batch_f16.safetensors"),
        &["--top-fraction", "1.5"],
        "top-fraction",
    );
    run(
        &fixture("batch_f16.safetensors"),
        &["--dual-clip", "1"],
        "dual-clip",
    );
    run(
        &fixture("batch_f16.safetensors"),
        &["--temperature", "0"],
        "temperature",
    );
    // No such input, not a safetensors file.
    run(&inputs.path().join("nope.safetensors"), &[], "cannot read");
    let junk = inputs.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    run(&junk, &[], "not a valid safetensors file");
}

#[test]
fn an_existing_output_is_left_alone_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    std::fs::write(&out_path, b"previous").unwrap();
    let out = loss_cmd(
        &fixture("batch_f16.safetensors"),
        &out_path,
        &["--eps-low", "-1"],
    );
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&out_path).unwrap(), b"previous");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn kernel_devices_match_cpu_or_fail_cleanly() {
    // Where the kernels are built (simt everywhere, cuda with a GPU) they agree with the reference;
    // where they are not, the command fails with the error and writes nothing.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let cpu = summary(&loss_cmd(&fixture("batch_f16.safetensors"), &out_path, &[]));
    std::fs::remove_file(&out_path).unwrap();
    for device in ["simt", "cuda"] {
        let out = loss_cmd(
            &fixture("batch_f16.safetensors"),
            &out_path,
            &["--device", device],
        );
        if out.status.success() {
            let s = summary(&out);
            assert_eq!(s["device"], device);
            let (a, b) = (s["loss"].as_f64().unwrap(), cpu["loss"].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{device}: {a} vs cpu {b}"
            );
            std::fs::remove_file(&out_path).unwrap();
        } else {
            assert_fails_without_output(&out, &out_path, "error");
        }
    }
}

#[test]
fn help_explains_every_option_and_default() {
    let out = vppo(&["loss", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (option, default) in [
        ("--input", ""),
        ("--output", ""),
        ("--group-size", "[default: 1]"),
        ("--perception", "[default: full-kl]"),
        ("--score-clamp", "[default: 10]"),
        ("--top-fraction", "[default: 0.4]"),
        ("--shaping", "[default: mean-preserving]"),
        ("--beta-min", "[default: 0.9]"),
        ("--beta-max", "[default: 1.1]"),
        (
            "--tas-scope",
            "[default: batch for mean-preserving, group for",
        ),
        ("--eps-low", "[default: 0.2]"),
        ("--eps-high", "[default: 0.28]"),
        ("--dual-clip", "[default: 3]"),
        ("--aggregation", "[default: token-mean]"),
        ("--token-normalizer", "[default: N"),
        ("--logp-penalty", "[default: 0.06]"),
        ("--temperature", "[default: 1]"),
        ("--loss-type", "[default: ppo]"),
        ("--kl-penalty", "[default: none]"),
        ("--kl-coef", "[default: 0.001]"),
        ("--device", "[default: cpu]"),
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
        assert!(
            help.contains(default),
            "--help lacks `{default}` for {option}:\n{help}"
        );
    }
    let top = vppo(&["--help"]);
    assert!(top.status.success());
    assert!(String::from_utf8_lossy(&top.stdout).contains("loss"));
}

/// SPEC 7 and issue 10: a temperature too small for the logits, and options whose loss overflows,
/// are errors naming what overflowed, on every host device; nothing is written (before: exit 0, loss
/// null in the summary, NaN in grad_logits).
#[test]
fn overflowing_options_fail_naming_what_overflowed() {
    let run = |extra: &[&str], needle: &str| {
        for device in ["cpu", "simt"] {
            let outdir = tempfile::tempdir().unwrap();
            let out_path = outdir.path().join("out.safetensors");
            let mut args = extra.to_vec();
            args.extend_from_slice(&["--device", device]);
            let out = loss_cmd(&fixture("batch_f16.safetensors"), &out_path, &args);
            assert_fails_without_output(&out, &out_path, needle);
        }
    };
    run(
        &["--temperature", "1e-38"],
        "config: temperature = 1e-38 is too small for logits row 0",
    );
    run(&["--temperature", "5e-324"], "config: temperature");
    run(&["--token-normalizer", "1e-300"], "overflow: loss is ");
    run(&["--logp-penalty", "1e308"], "overflow: loss is ");
}

/// Negative numbers are values as separate words (clap read `-0.5` as an unknown flag `-0`), and are
/// then validated like any other value.
#[test]
fn negative_numbers_parse_as_values_and_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let fixture = fixture("batch_f16.safetensors");
    let ok = loss_cmd(&fixture, &out_path, &["--logp-penalty", "-0.5"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_file(&out_path).unwrap();
    for (args, needle) in [
        (&["--beta-min", "-0.1"][..], "config: beta-min = -0.1"),
        (&["--eps-low", "-1"][..], "config: eps-low = -1"),
        (&["--temperature", "-2"][..], "config: temperature = -2 "),
        (&["--dual-clip", "-3"][..], "config: dual-clip = -3"),
    ] {
        let out = loss_cmd(&fixture, &out_path, args);
        assert_fails_without_output(&out, &out_path, needle);
    }
    let train = vppo(&["train", "--lr", "-1", "--steps", "1", "--quiet"]);
    assert!(!train.status.success());
    let stderr = String::from_utf8_lossy(&train.stderr);
    assert!(stderr.contains("config: lr = -1"), "{stderr}");
    let bench = vppo(&["bench", "--synthetic", "-4,8,1,f32"]);
    assert!(!bench.status.success());
    let stderr = String::from_utf8_lossy(&bench.stderr);
    assert!(stderr.contains("N `-4` is not a whole number"), "{stderr}");
}

/// A synthetic batch larger than the machine is an error before anything is allocated (it aborted
/// in an allocation).
#[test]
fn an_impossible_synthetic_size_is_an_error() {
    let out = vppo(&["bench", "--synthetic", "1000000,1000000,8,bf16"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vppo bench: error: config: synthetic = 1000000,1000000,8,bf16"),
        "{stderr}"
    );
    let out = vppo(&["bench", "--synthetic", "2000000000,100000000000,8,f32"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("within the address space"), "{stderr}");
}

/// `--output` naming the input file (the same path, another path to it, a hard link) is refused and
/// the input is left as it was (it was silently replaced by the outputs).
#[test]
fn output_over_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    std::fs::copy(fixture("batch_f16.safetensors"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let link = dir.path().join("link.safetensors");
    std::fs::hard_link(&input, &link).unwrap();
    for output in [
        input.clone(),
        dir.path().join("sub/../in.safetensors"),
        dir.path().join("./in.safetensors"),
        link,
    ] {
        let out = loss_cmd(&input, &output, &[]);
        assert!(!out.status.success(), "{}", output.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("config: output =") && stderr.contains("other than --input"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&input).unwrap(), before);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

/// `--grad-dtype logits` writes grad_logits in the logits dtype (f16 here), equal to the f32
/// gradient rounded; the default stays f32.
#[test]
fn grad_dtype_logits_writes_the_gradient_in_the_logits_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.safetensors");
    let f16_path = dir.path().join("f16.safetensors");
    let a = loss_cmd(&fixture("batch_f16.safetensors"), &f32_path, &[]);
    assert_eq!(summary(&a)["grad_dtype"], "f32");
    let b = loss_cmd(
        &fixture("batch_f16.safetensors"),
        &f16_path,
        &["--grad-dtype", "logits"],
    );
    assert_eq!(summary(&b)["grad_dtype"], "f16");
    let bytes = std::fs::read(&f16_path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let g = st.tensor("grad_logits").unwrap();
    assert_eq!(g.dtype(), StDtype::F16);
    assert_eq!(g.shape(), &[13, 11]);
    let got: Vec<f32> = g
        .data()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let want = &read_all(&f32_path)["grad_logits"].2;
    assert_eq!(got.len(), want.len());
    for (&x, &w) in got.iter().zip(want) {
        // rounded once from f64 to f16; w is the f64 value rounded to f32
        assert!((x as f64 - w).abs() <= 1e-3 * w.abs() + 1e-7, "{x} vs {w}");
    }
    // Every other tensor is the same.
    let (fa, fb) = (read_all(&f32_path), read_all(&f16_path));
    for (name, v) in &fa {
        if name != "grad_logits" {
            assert_eq!(v, &fb[name], "{name}");
        }
    }
}

/// SPEC 12 through the command line: `ref_logp` is read from the input file when present and
/// `--kl-penalty` / `--kl-coef` reach the loss (the official names `kl` and `low-var-kl` are aliases
/// of k1 and k3); the summary reports kl_loss. A penalty without ref_logp in the file, or a
/// ref_logp of the wrong length or dtype, fails naming ref_logp and writes nothing.
#[test]
fn kl_penalty_reads_ref_logp_from_the_input() {
    let inputs = tempfile::tempdir().unwrap();
    let owned = vppo::io::read_batch(&fixture("batch_f16.safetensors")).unwrap();
    let n = owned.targets.len();
    let ref_logp: Vec<f32> = owned
        .old_logp
        .iter()
        .enumerate()
        .map(|(t, &x)| x + [0.3, -0.8, 2.9, -0.1][t % 4])
        .collect();
    let bytes: Vec<u8> = ref_logp.iter().flat_map(|x| x.to_le_bytes()).collect();
    let with_ref = edited_fixture(
        inputs.path(),
        "ref_logp",
        Some((StDtype::F32, vec![n], bytes.clone())),
    );
    let with = vppo::OwnedBatch {
        ref_logp: Some(ref_logp),
        ..owned.clone()
    };
    assert_eq!(vppo::io::read_batch(&with_ref).unwrap(), with);
    for (name, penalty) in [
        ("k1", vppo::KlPenalty::K1),
        ("kl", vppo::KlPenalty::K1),
        ("abs", vppo::KlPenalty::Abs),
        ("mse", vppo::KlPenalty::Mse),
        ("k3", vppo::KlPenalty::K3),
        ("low-var-kl", vppo::KlPenalty::K3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out.safetensors");
        let out = loss_cmd(
            &with_ref,
            &out_path,
            &["--kl-penalty", name, "--kl-coef", "0.3"],
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = VppoConfig {
            kl_penalty: penalty,
            kl_coef: 0.3,
            ..VppoConfig::default()
        };
        let want = Vppo::new(cfg, Device::Reference)
            .unwrap()
            .forward(&with.batch())
            .unwrap();
        let s = summary(&out);
        assert_eq!(s["loss"].as_f64().unwrap(), want.loss, "{name}");
        // (serde_json's float parsing may be one ulp off the printed shortest decimal)
        let kl_loss = s["kl_loss"].as_f64().unwrap();
        assert!(
            (kl_loss - want.kl_loss).abs() <= 1e-15 * want.kl_loss.abs(),
            "{name}: kl_loss {kl_loss} vs {}",
            want.kl_loss
        );
        assert!(
            want.kl_loss > 0.0 || penalty == vppo::KlPenalty::K1,
            "{name}"
        );
        let written = read_all(&out_path);
        let dlogp: Vec<f64> = want.tokens.dlogp.iter().map(|&x| x as f64).collect();
        assert_eq!(written["dlogp"].2, dlogp, "{name}");
    }
    // Without --kl-penalty the file's ref_logp changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let plain = summary(&loss_cmd(&with_ref, &out_path, &[]));
    let base = Vppo::new(VppoConfig::default(), Device::Reference)
        .unwrap()
        .forward(&owned.batch())
        .unwrap();
    assert_eq!(plain["loss"].as_f64().unwrap(), base.loss);
    assert_eq!(plain["kl_loss"].as_f64().unwrap(), 0.0);

    let run = |input: &Path, extra: &[&str], needle: &str| {
        let outdir = tempfile::tempdir().unwrap();
        let out_path = outdir.path().join("out.safetensors");
        let out = loss_cmd(input, &out_path, extra);
        assert_fails_without_output(&out, &out_path, needle);
    };
    run(
        &fixture("batch_f16.safetensors"),
        &["--kl-penalty", "k3"],
        "ref_logp is missing: kl_penalty = k3 needs",
    );
    let short = edited_fixture(
        inputs.path(),
        "ref_logp",
        Some((StDtype::F32, vec![n - 1], bytes[4..].to_vec())),
    );
    run(
        &short,
        &["--kl-penalty", "mse"],
        &format!(
            "shape mismatch in ref_logp: has {} elements, expected N = {n}",
            n - 1
        ),
    );
    let f16 = edited_fixture(
        inputs.path(),
        "ref_logp",
        Some((StDtype::F16, vec![n], vec![0; 2 * n])),
    );
    run(
        &f16,
        &["--kl-penalty", "k1"],
        "ref_logp: has dtype F16, expected F32",
    );
    run(
        &with_ref,
        &["--kl-penalty", "k3", "--kl-coef", "-0.5"],
        "kl-coef = -0.5 is out of range",
    );
    run(
        &fixture("batch_f16.safetensors"),
        &["--kl-penalty", "full"],
        "ref_logits is missing: kl_penalty = full needs",
    );
}

/// SPEC 12 `full` through the command line: `ref_logits` (the shape and dtype of logits) is read
/// from the input file when present, `--kl-penalty full` computes the exact KL to it; without it,
/// or with another dtype or shape, the run fails naming ref_logits and writes nothing.
#[test]
fn full_kl_penalty_reads_ref_logits_from_the_input() {
    let inputs = tempfile::tempdir().unwrap();
    let owned = vppo::io::read_batch(&fixture("batch_f16.safetensors")).unwrap();
    let (n, v) = (owned.targets.len(), owned.vocab);
    let vppo::OwnedLogits::F16(logits) = &owned.logits else {
        panic!("the fixture is f16")
    };
    // the policy's logits moved by -1/4, 0 or +1/4 (exact in f16), -inf where they are -inf
    let reference: Vec<half::f16> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| half::f16::from_f32(x.to_f32() + 0.25 * ((i % 3) as f32 - 1.0)))
        .collect();
    let bytes: Vec<u8> = reference
        .iter()
        .flat_map(|x| x.to_bits().to_le_bytes())
        .collect();
    let with_ref = edited_fixture(
        inputs.path(),
        "ref_logits",
        Some((StDtype::F16, vec![n, v], bytes.clone())),
    );
    let with = vppo::OwnedBatch {
        ref_logits: Some(vppo::OwnedLogits::F16(reference)),
        ..owned.clone()
    };
    assert_eq!(vppo::io::read_batch(&with_ref).unwrap(), with);
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let out = loss_cmd(
        &with_ref,
        &out_path,
        &["--kl-penalty", "full", "--kl-coef", "0.3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = VppoConfig {
        kl_penalty: vppo::KlPenalty::Full,
        kl_coef: 0.3,
        ..VppoConfig::default()
    };
    let want = Vppo::new(cfg, Device::Reference)
        .unwrap()
        .forward(&with.batch())
        .unwrap();
    let s = summary(&out);
    assert_eq!(s["loss"].as_f64().unwrap(), want.loss);
    let kl_loss = s["kl_loss"].as_f64().unwrap();
    assert!(want.kl_loss > 0.0);
    assert!((kl_loss - want.kl_loss).abs() <= 1e-15 * want.kl_loss);

    let run = |input: &Path, extra: &[&str], needle: &str| {
        let outdir = tempfile::tempdir().unwrap();
        let out_path = outdir.path().join("out.safetensors");
        let out = loss_cmd(input, &out_path, extra);
        assert_fails_without_output(&out, &out_path, needle);
    };
    let f32s = edited_fixture(
        inputs.path(),
        "ref_logits",
        Some((StDtype::F32, vec![n, v], vec![0; 4 * n * v])),
    );
    run(
        &f32s,
        &["--kl-penalty", "full"],
        "shape mismatch in ref_logits: dtype f32 differs from logits dtype f16",
    );
    let short = edited_fixture(
        inputs.path(),
        "ref_logits",
        Some((StDtype::F16, vec![n - 1, v], bytes[2 * v..].to_vec())),
    );
    run(
        &short,
        &["--kl-penalty", "full"],
        "shape mismatch in ref_logits: has shape",
    );
}
