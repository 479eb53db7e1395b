//! Reading a packed batch from, and writing the outputs to, safetensors files (SPEC section 9).
//!
//! Input tensors, by name: `logits` and `logits_masked` ([N, V], F32, F16 or BF16, the same dtype),
//! `targets` (`[N]`) and `cu_seqlens` (`[B + 1]`) in I32 (I64 is accepted when every value fits in i32),
//! `old_logp` (`[N]`) and `advantages` (`[B]`) in F32; optionally `ref_logp` (`[N]`, F32), the
//! reference policy's log-probs of the KL penalty (SPEC section 12). Other tensors in the file are
//! ignored.
//!
//! Output tensors: `loss` (F32, `[1]`), `score`, `kl`, `k3`, `entropy`, `logp` (F32, `[N]`), `mask`
//! (U8, `[N]`), `sbar`, `alpha` (F32, `[B]`) and, when given, `grad_logits` (`[N, V]`, F32 or the logits
//! dtype); also `lse`,
//! `logp_masked`, `dlogp` (F32, `[N]`) and `k` (I32, `[B]`). A file is written to a temporary name in the
//! same folder and renamed over the target only once it is complete.

use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::batch::{Batch, Dtype, Logits};
use crate::error::{Result, Tensor, VppoError};
use crate::output::VppoOutput;

pub use crate::tensor::OwnedLogits;

impl OwnedLogits {
    /// `len` zeros of `dtype`, or an error naming the gradient when that much memory cannot be had
    /// (an allocation that fails is an error here, not an abort). For a gradient buffer.
    pub fn zeros(dtype: Dtype, len: usize) -> Result<OwnedLogits> {
        fn zeroed<T: Clone>(len: usize, zero: T) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!(
                    "cannot allocate {len} elements ({} bytes)",
                    len.saturating_mul(std::mem::size_of::<T>())
                ),
            })?;
            v.resize(len, zero);
            Ok(v)
        }
        Ok(match dtype {
            Dtype::F32 => OwnedLogits::F32(zeroed(len, 0.0)?),
            Dtype::F16 => OwnedLogits::F16(zeroed(len, f16::ZERO)?),
            Dtype::Bf16 => OwnedLogits::Bf16(zeroed(len, bf16::ZERO)?),
        })
    }

    /// Every element widened exactly to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            OwnedLogits::F32(x) => x.clone(),
            OwnedLogits::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
            OwnedLogits::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// A packed batch that owns its tensors (read from a file, or built by a test). [`OwnedBatch::batch`]
/// lends it as a [`Batch`]. `Default` is the empty batch (N = B = 0, `cu_seqlens = [0]`), for
/// struct-update syntax.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedBatch {
    /// [N, V] logits given the real image.
    pub logits: OwnedLogits,
    /// [N, V] logits given the masked image.
    pub logits_masked: OwnedLogits,
    /// `[N]` sampled token ids.
    pub targets: Vec<i32>,
    /// `[N]` old-policy log-probs.
    pub old_logp: Vec<f32>,
    /// `[B]` advantages.
    pub advantages: Vec<f32>,
    /// [B + 1] response boundaries.
    pub cu_seqlens: Vec<i32>,
    /// V.
    pub vocab: usize,
    /// `[N]` optional reference-policy log-probs (the KL penalty's `ref_logp`).
    pub ref_logp: Option<Vec<f32>>,
    /// [N, V] optional reference-policy logits (the `full` KL penalty's `ref_logits`), the shape and
    /// dtype of `logits`.
    pub ref_logits: Option<OwnedLogits>,
}

impl Default for OwnedBatch {
    fn default() -> Self {
        OwnedBatch {
            logits: OwnedLogits::F32(Vec::new()),
            logits_masked: OwnedLogits::F32(Vec::new()),
            targets: Vec::new(),
            old_logp: Vec::new(),
            advantages: Vec::new(),
            cu_seqlens: vec![0],
            vocab: 0,
            ref_logp: None,
            ref_logits: None,
        }
    }
}

impl OwnedBatch {
    /// The borrowed batch.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            logits: self.logits.view(),
            logits_masked: self.logits_masked.view(),
            targets: &self.targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu_seqlens,
            vocab: self.vocab,
            ref_logp: self.ref_logp.as_deref(),
            ref_logits: self.ref_logits.as_ref().map(|r| r.view()),
            ..Batch::default()
        }
    }

    /// The same batch with its logits widened exactly to f32.
    pub fn to_f32(&self) -> OwnedBatch {
        OwnedBatch {
            logits: OwnedLogits::F32(self.logits.to_f32()),
            logits_masked: OwnedLogits::F32(self.logits_masked.to_f32()),
            ref_logits: self
                .ref_logits
                .as_ref()
                .map(|r| OwnedLogits::F32(r.to_f32())),
            ..self.clone()
        }
    }
}

fn tensor_of(name: &str) -> Tensor {
    match name {
        "logits" => Tensor::Logits,
        "logits_masked" => Tensor::LogitsMasked,
        "targets" => Tensor::Targets,
        "old_logp" => Tensor::OldLogp,
        "advantages" => Tensor::Advantages,
        "ref_logp" => Tensor::RefLogp,
        "ref_logits" => Tensor::RefLogits,
        _ => Tensor::CuSeqlens,
    }
}

fn get<'a>(st: &'a SafeTensors<'a>, name: &str, rank: usize) -> Result<TensorView<'a>> {
    let view = st
        .tensor(name)
        .map_err(|_| VppoError::Io(format!("input has no tensor named `{name}`")))?;
    if view.shape().len() != rank {
        return Err(VppoError::Shape {
            tensor: tensor_of(name),
            detail: format!("has shape {:?}, expected {rank} dimensions", view.shape()),
        });
    }
    Ok(view)
}

fn wrong_dtype(name: &str, found: StDtype, expected: &str) -> VppoError {
    VppoError::Shape {
        tensor: tensor_of(name),
        detail: format!("has dtype {found:?}, expected {expected}"),
    }
}

// Little-endian element decoding; safetensors data need not be aligned, so bytes are copied.
fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u16s(data: &[u8]) -> impl Iterator<Item = u16> + '_ {
    data.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}

fn read_f32(st: &SafeTensors, name: &str) -> Result<Vec<f32>> {
    let view = get(st, name, 1)?;
    match view.dtype() {
        StDtype::F32 => Ok(f32s(view.data())),
        d => Err(wrong_dtype(name, d, "F32")),
    }
}

fn read_i32(st: &SafeTensors, name: &str) -> Result<Vec<i32>> {
    let view = get(st, name, 1)?;
    match view.dtype() {
        StDtype::I32 => Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        StDtype::I64 => view
            .data()
            .chunks_exact(8)
            .enumerate()
            .map(|(i, c)| {
                let x = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                i32::try_from(x).map_err(|_| VppoError::Shape {
                    tensor: tensor_of(name),
                    detail: format!("I64 value {x} at element {i} does not fit in i32"),
                })
            })
            .collect(),
        d => Err(wrong_dtype(name, d, "I32 (or I64 within the i32 range)")),
    }
}

fn read_logits(st: &SafeTensors, name: &str) -> Result<(OwnedLogits, [usize; 2])> {
    let view = get(st, name, 2)?;
    let shape = [view.shape()[0], view.shape()[1]];
    let logits = match view.dtype() {
        StDtype::F32 => OwnedLogits::F32(f32s(view.data())),
        StDtype::F16 => OwnedLogits::F16(u16s(view.data()).map(f16::from_bits).collect()),
        StDtype::BF16 => OwnedLogits::Bf16(u16s(view.data()).map(bf16::from_bits).collect()),
        d => return Err(wrong_dtype(name, d, "F32, F16 or BF16")),
    };
    Ok((logits, shape))
}

/// Parses a batch from the bytes of a safetensors file. Shapes are checked against each other here
/// only as far as the file format needs (logits and logits_masked are 2-D with the same shape and
/// dtype); the rest is checked by [`Batch::validate_small`] when the loss is computed.
pub fn batch_from_bytes(bytes: &[u8]) -> Result<OwnedBatch> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| VppoError::Io(format!("not a valid safetensors file: {e}")))?;
    let (logits, shape) = read_logits(&st, "logits")?;
    let (logits_masked, shape_m) = read_logits(&st, "logits_masked")?;
    if shape_m != shape {
        return Err(VppoError::Shape {
            tensor: Tensor::LogitsMasked,
            detail: format!("has shape {shape_m:?}, logits has {shape:?}"),
        });
    }
    if std::mem::discriminant(&logits) != std::mem::discriminant(&logits_masked) {
        return Err(VppoError::Shape {
            tensor: Tensor::LogitsMasked,
            detail: format!(
                "dtype {} differs from logits dtype {}",
                logits_masked.view().dtype().name(),
                logits.view().dtype().name()
            ),
        });
    }
    let targets = read_i32(&st, "targets")?;
    if targets.len() != shape[0] {
        return Err(VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!(
                "has {} elements, logits has N = {} rows",
                targets.len(),
                shape[0]
            ),
        });
    }
    Ok(OwnedBatch {
        logits,
        logits_masked,
        targets,
        old_logp: read_f32(&st, "old_logp")?,
        advantages: read_f32(&st, "advantages")?,
        cu_seqlens: read_i32(&st, "cu_seqlens")?,
        vocab: shape[1],
        ref_logp: match st.tensor("ref_logp") {
            Ok(_) => Some(read_f32(&st, "ref_logp")?),
            Err(_) => None,
        },
        ref_logits: match st.tensor("ref_logits") {
            Ok(_) => {
                let (r, shape_r) = read_logits(&st, "ref_logits")?;
                if shape_r != shape {
                    return Err(VppoError::Shape {
                        tensor: Tensor::RefLogits,
                        detail: format!("has shape {shape_r:?}, logits has {shape:?}"),
                    });
                }
                Some(r)
            }
            Err(_) => None,
        },
    })
}

/// Reads a batch from a safetensors file (see the module docs for the tensor names and dtypes).
pub fn read_batch(path: &Path) -> Result<OwnedBatch> {
    let bytes = std::fs::read(path)
        .map_err(|e| VppoError::Io(format!("cannot read {}: {e}", path.display())))?;
    batch_from_bytes(&bytes)
}

/// Little-endian bytes of a slice of plain numbers: borrowed on a little-endian host (no copy),
/// converted where the host is big-endian.
fn le_bytes<T: bytemuck::Pod>(x: &[T]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(x))
    } else {
        let size = std::mem::size_of::<T>();
        std::borrow::Cow::Owned(
            bytemuck::cast_slice::<T, u8>(x)
                .chunks_exact(size)
                .flat_map(|c| c.iter().rev().copied())
                .collect(),
        )
    }
}

/// One output tensor: name, dtype, shape and little-endian bytes.
type OutTensor<'a> = (
    &'static str,
    StDtype,
    Vec<usize>,
    std::borrow::Cow<'a, [u8]>,
);

/// The bytes of the output tensors, in file order, borrowing the output vectors and the gradient
/// (only `loss`, one value, and `k`, B values clamped to i32, are made here).
fn output_tensors<'a>(
    out: &'a VppoOutput,
    grad: Option<Logits<'a>>,
    vocab: usize,
    loss: &'a [f32; 1],
    k: &'a [i32],
) -> Vec<OutTensor<'a>> {
    let n = out.tokens.logp.len();
    let b = out.responses.alpha.len();
    let t = &out.tokens;
    let r = &out.responses;
    let f32s = |name, x: &'a [f32], len| (name, StDtype::F32, vec![len], le_bytes(x));
    let mut tensors = vec![
        f32s("loss", loss, 1),
        f32s("score", &t.score, n),
        f32s("kl", &t.kl, n),
        f32s("k3", &t.k3, n),
        f32s("entropy", &t.entropy, n),
        f32s("logp", &t.logp, n),
        f32s("logp_masked", &t.logp_masked, n),
        f32s("lse", &t.lse, n),
        f32s("dlogp", &t.dlogp, n),
        (
            "mask",
            StDtype::U8,
            vec![n],
            std::borrow::Cow::Borrowed(&t.mask[..]),
        ),
        f32s("sbar", &r.sbar, b),
        f32s("alpha", &r.alpha, b),
        ("k", StDtype::I32, vec![b], le_bytes(k)),
    ];
    if let Some(g) = grad {
        let (dtype, bytes) = match g {
            Logits::F32(x) => (StDtype::F32, le_bytes(x)),
            Logits::F16(x) => (StDtype::F16, le_bytes(x)),
            Logits::Bf16(x) => (StDtype::BF16, le_bytes(x)),
        };
        tensors.push(("grad_logits", dtype, vec![n, vocab], bytes));
    }
    tensors
}

/// Calls `f` with the safetensors views of the outputs (see [`output_tensors`]).
fn with_output_views<R>(
    out: &VppoOutput,
    grad: Option<Logits>,
    vocab: usize,
    f: impl FnOnce(Vec<(String, TensorView)>) -> Result<R>,
) -> Result<R> {
    let loss = [out.loss as f32];
    let k: Vec<i32> = out
        .responses
        .k
        .iter()
        .map(|&k| k.min(i32::MAX as u32) as i32)
        .collect();
    let tensors = output_tensors(out, grad, vocab, &loss, &k);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, data) in &tensors {
        let view = TensorView::new(*dtype, shape.clone(), data)
            .map_err(|e| VppoError::Io(format!("cannot build output tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    f(views)
}

/// Serializes the outputs of one evaluation to safetensors bytes: `loss`, the per-token and
/// per-response tensors and, when `grad` is given, `grad_logits` [N, `vocab`] in its own dtype.
pub fn outputs_to_bytes(out: &VppoOutput, grad: Option<Logits>, vocab: usize) -> Result<Vec<u8>> {
    with_output_views(out, grad, vocab, |views| {
        safetensors::serialize(views, &None)
            .map_err(|e| VppoError::Io(format!("cannot serialize the outputs: {e}")))
    })
}

/// A temporary name next to `path`, unique within the machine: the process id and a counter of this
/// process (two writers of one path, in one process or two, never share a temporary file).
pub fn temp_path(path: &Path) -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| VppoError::Io(format!("output path {} has no file name", path.display())))?;
    Ok(dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Writes a file atomically: `write` fills a temporary file in the same folder ([`temp_path`]),
/// which is then renamed over `path`. On any error the temporary file is removed and `path` is left
/// untouched.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = write(&tmp).and_then(|_| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        VppoError::Io(format!("cannot write {}: {e}", path.display()))
    })
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| e.to_string())
    })
}

/// Writes the outputs (and `grad_logits` when given, in its own dtype) to the safetensors file
/// `path`, atomically. The tensors are streamed to the file from the output vectors and the gradient
/// buffer as they are: no copy of the [N, V] gradient and no image of the file is made in memory.
pub fn write_outputs(
    path: &Path,
    out: &VppoOutput,
    grad: Option<Logits>,
    vocab: usize,
) -> Result<()> {
    with_output_views(out, grad, vocab, |views| {
        write_atomic_with(path, |tmp| {
            safetensors::serialize_to_file(views, &None, tmp).map_err(|e| e.to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor_bytes(views: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
        let v: Vec<(String, TensorView)> = views
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(v, &None).unwrap()
    }

    fn le<T: Copy, const K: usize>(x: &[T], f: impl Fn(T) -> [u8; K]) -> Vec<u8> {
        x.iter().flat_map(|&v| f(v)).collect()
    }

    #[test]
    fn reads_bf16_logits_and_i64_indices() {
        let logits = [
            bf16::from_f32(0.5),
            bf16::from_f32(-1.25),
            bf16::NEG_INFINITY,
            bf16::ONE,
        ];
        let logits_view = |name| {
            let bytes = le(&logits, |v| v.to_bits().to_le_bytes());
            (name, StDtype::BF16, vec![2, 2], bytes)
        };
        let bytes = tensor_bytes(vec![
            logits_view("logits"),
            logits_view("logits_masked"),
            (
                "targets",
                StDtype::I64,
                vec![2],
                le(&[1i64, 1], i64::to_le_bytes),
            ),
            (
                "old_logp",
                StDtype::F32,
                vec![2],
                le(&[-0.5f32, -0.25], f32::to_le_bytes),
            ),
            (
                "advantages",
                StDtype::F32,
                vec![1],
                le(&[1.0f32], f32::to_le_bytes),
            ),
            (
                "cu_seqlens",
                StDtype::I64,
                vec![2],
                le(&[0i64, 2], i64::to_le_bytes),
            ),
        ]);
        let b = batch_from_bytes(&bytes).unwrap();
        assert_eq!(b.logits, OwnedLogits::Bf16(logits.to_vec()));
        assert_eq!(b.targets, vec![1, 1]);
        assert_eq!(b.cu_seqlens, vec![0, 2]);
        assert_eq!(b.vocab, 2);
        b.batch().validate_small(1, false).unwrap();

        // An I64 value outside i32 is an error naming the tensor.
        let bytes = tensor_bytes(vec![
            logits_view("logits"),
            logits_view("logits_masked"),
            (
                "targets",
                StDtype::I64,
                vec![2],
                le(&[1i64 << 40, 1], i64::to_le_bytes),
            ),
        ]);
        let e = batch_from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(
                e,
                VppoError::Shape {
                    tensor: Tensor::Targets,
                    ..
                }
            ),
            "{e}"
        );
        // logits_masked of another dtype
        let bytes = tensor_bytes(vec![
            logits_view("logits"),
            ("logits_masked", StDtype::F16, vec![2, 2], vec![0; 8]),
        ]);
        let e = batch_from_bytes(&bytes).unwrap_err();
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
    fn empty_outputs_serialize() {
        let out = VppoOutput {
            responses: crate::output::ResponseOutputs {
                sbar: vec![0.0],
                k: vec![0],
                alpha: vec![1.0],
            },
            ..VppoOutput::default()
        };
        let bytes = outputs_to_bytes(&out, Some(Logits::F32(&[])), 7).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("grad_logits").unwrap().shape(), &[0, 7]);
        assert_eq!(st.tensor("alpha").unwrap().shape(), &[1]);
        assert_eq!(st.tensor("loss").unwrap().data(), &0f32.to_le_bytes());
    }
}
