//! `vppo._vppo`: the extension module behind `vppo.torch` (SPEC section 13).
//!
//! It links no libtorch. A tensor crosses as `(data_ptr, numel)` with the dtype given once per
//! call; the Python side (python/vppo/torch.py) checks device, dtype, contiguity and element counts
//! before every call and allocates every output with `torch.empty`, which this module fills. The
//! lengths the crate's API sees are re-checked here (products with `checked_mul`), and every error of
//! the crate comes back as ValueError carrying its message (RuntimeError for a missing GPU or driver).

use clap::Parser;
use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use vppo::cuda::{Borrowed, Gpu};
use vppo::{
    Batch, Collective, Device, DeviceBatch, DeviceFullKlSaved, DeviceKlBatch, DeviceKlSaved,
    DeviceLogits, DeviceLogitsMut, DeviceSaved, Dtype, GradMut, KlBatch, KlDiv, KlSaved, LaneOrder,
    Logits, ReduceOp, SavedForward, Tensor, VocabShard, Vppo, VppoError,
};

/// A tensor as Python passes it: its data pointer (an address in this process) and element count.
type Raw = (usize, usize);

/// The command line's loss options (src/options.rs), parsed from the Python keyword arguments:
/// one source of names, defaults and value checks for both.
#[derive(Parser)]
#[command(name = "vppo_loss", no_binary_name = true)]
struct Options {
    #[command(flatten)]
    loss: vppo::options::LossOptions,
}

fn value_error(e: VppoError) -> PyErr {
    match e {
        VppoError::KernelsNotBuilt | VppoError::NoCudaDriver | VppoError::NoGpu(_) => {
            PyRuntimeError::new_err(e.to_string())
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn bad(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// The `Vppo` of a call: `options` is a JSON object of the Python keyword arguments (names with
/// `_`, values as the command line takes them; null = the default; true = a flag given), plus the
/// Python-only `tas_range` ([lo, hi]).
fn build(device: &str, options: &str) -> PyResult<Vppo> {
    build_on(cpu_device(device)?, options)
}

/// The executor for CPU tensors named `device`: "simt" (the kernels on the SIMT executor) or
/// "reference" (the f64 reference).
fn cpu_device(device: &str) -> PyResult<Device> {
    match device {
        "reference" => Ok(Device::Reference),
        "simt" => Ok(Device::Simt(LaneOrder::Forward)),
        other => Err(bad(format!(
            "device must be \"simt\" or \"reference\" for CPU tensors, not {other:?}"
        ))),
    }
}

/// [`build`] on an explicit executor (`Device::Cuda(ordinal)` for CUDA tensors).
fn build_on(device: Device, options: &str) -> PyResult<Vppo> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(options)
        .map_err(|e| bad(format!("options are not a JSON object: {e}")))?;
    let mut args = Vec::new();
    let mut tas_range = None;
    for (key, value) in &map {
        if key == "tas_range" {
            tas_range = match value {
                serde_json::Value::Null => None,
                serde_json::Value::Array(a) if a.len() == 2 => {
                    match (a[0].as_f64(), a[1].as_f64()) {
                        (Some(lo), Some(hi)) => Some((lo, hi)),
                        _ => return Err(bad(format!("tas_range must be (lo, hi), not {value}"))),
                    }
                }
                _ => return Err(bad(format!("tas_range must be (lo, hi), not {value}"))),
            };
            continue;
        }
        if key == "device" {
            return Err(bad(
                "device is a keyword of vppo_loss, not a loss option".into()
            ));
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Bool(true) => args.push(flag),
            serde_json::Value::String(s) => args.push(format!("{flag}={}", s.replace('_', "-"))),
            serde_json::Value::Number(n) => args.push(format!("{flag}={n}")),
            other => return Err(bad(format!("option {key} has the value {other}"))),
        }
    }
    let parsed = Options::try_parse_from(&args).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("").trim();
        bad(format!(
            "bad loss option: {}",
            first.strip_prefix("error: ").unwrap_or(first)
        ))
    })?;
    let mut config = parsed.loss.config();
    config.tas_range = tas_range;
    Vppo::new(config, device).map_err(value_error)
}

fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    match dtype {
        "float32" => Ok(Dtype::F32),
        "float16" => Ok(Dtype::F16),
        "bfloat16" => Ok(Dtype::Bf16),
        other => Err(bad(format!(
            "logits dtype must be float32, float16 or bfloat16, not {other}"
        ))),
    }
}

/// # Safety
/// `raw.0` must point to `raw.1` initialized elements of `T` (or be anything when `raw.1` is 0) that
/// nothing writes while the slice lives.
unsafe fn slice<'a, T>(raw: Raw) -> &'a [T] {
    if raw.1 == 0 {
        return &[];
    }
    // SAFETY: the caller guarantees raw.1 valid, aligned, unaliased-by-writers elements at raw.0.
    unsafe { std::slice::from_raw_parts(raw.0 as *const T, raw.1) }
}

/// # Safety
/// `raw.0` must point to `raw.1` elements of `T` that nothing else reads or writes while the slice
/// lives (or be anything when `raw.1` is 0).
unsafe fn slice_mut<'a, T>(raw: Raw) -> &'a mut [T] {
    if raw.1 == 0 {
        return &mut [];
    }
    // SAFETY: the caller guarantees raw.1 valid, aligned elements at raw.0, borrowed by us alone.
    unsafe { std::slice::from_raw_parts_mut(raw.0 as *mut T, raw.1) }
}

/// The logits of `dtype` at `raw`.
///
/// # Safety
/// As [`slice`] for the element type of `dtype`.
unsafe fn logits<'a>(dtype: Dtype, raw: Raw) -> Logits<'a> {
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            Dtype::F32 => Logits::F32(slice::<f32>(raw)),
            Dtype::F16 => Logits::F16(slice::<f16>(raw)),
            Dtype::Bf16 => Logits::Bf16(slice::<bf16>(raw)),
        }
    }
}

/// A writable buffer of `dtype` at `raw`.
///
/// # Safety
/// As [`slice_mut`] for the element type of `dtype`.
unsafe fn grad_mut<'a>(dtype: Dtype, raw: Raw) -> GradMut<'a> {
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            Dtype::F32 => GradMut::F32(slice_mut::<f32>(raw)),
            Dtype::F16 => GradMut::F16(slice_mut::<f16>(raw)),
            Dtype::Bf16 => GradMut::Bf16(slice_mut::<bf16>(raw)),
        }
    }
}

/// Checks that `numel` elements of a tensor named `name` make whole rows of `vocab`.
fn rows_of(name: &str, numel: usize, vocab: usize) -> PyResult<usize> {
    if vocab == 0 || numel % vocab != 0 {
        return Err(bad(format!(
            "{name} has {numel} elements, not a whole number of rows of V = {vocab}"
        )));
    }
    Ok(numel / vocab)
}

fn want_len(name: &str, got: usize, want: usize) -> PyResult<()> {
    if got != want {
        return Err(bad(format!("{name} has {got} elements, expected {want}")));
    }
    Ok(())
}

/// The length checks of [`forward`]'s arguments, before anything is read.
#[allow(clippy::too_many_arguments)]
fn forward_checks(
    vocab: usize,
    logits: &Raw,
    logits_masked: &Raw,
    targets: &Raw,
    old_logp: &Raw,
    advantages: &Raw,
    rows: &Option<Raw>,
    masked_rows: &Option<Raw>,
    ref_logp: &Option<Raw>,
    out: &[Raw],
) -> PyResult<()> {
    rows_of("logits", logits.1, vocab)?;
    rows_of("logits_masked", logits_masked.1, vocab)?;
    let n = targets.1;
    let b = advantages.1;
    want_len("old_logp", old_logp.1, n)?;
    if let Some(r) = rows {
        want_len("rows", r.1, n)?;
    } else {
        // Without rows the logits are [N, V]: N * V must not overflow.
        n.checked_mul(vocab)
            .ok_or_else(|| bad(format!("logits: N = {n} times V = {vocab} overflows")))?;
    }
    if let Some(r) = masked_rows {
        want_len("masked_rows", r.1, n)?;
    }
    if let Some(r) = ref_logp {
        want_len("ref_logp", r.1, n)?;
    }
    if out.len() != 13 {
        return Err(bad(format!(
            "forward takes 13 output buffers, not {}",
            out.len()
        )));
    }
    for (i, o) in out.iter().enumerate() {
        want_len("an output buffer", o.1, if i < 10 { n } else { b })?;
    }
    Ok(())
}

/// A torch.distributed group as the crate's [`Collective`]: `reduce(values, op)` is the Python
/// function of vppo/torch.py that reduces a list of floats over the group ("sum" or "max", every
/// rank receiving the same values). Called from the crate with the GIL released: it takes the GIL.
struct PyGroup {
    rank: usize,
    size: usize,
    reduce: Py<PyAny>,
}

impl PyGroup {
    /// `reduce(values, op)` in Python ("sum", "max" or "gather"), checked to return `want` values.
    fn call(&self, values: &[f64], op: &str, want: usize) -> vppo::Result<Vec<f64>> {
        let out: Vec<f64> = Python::attach(|py| {
            self.reduce
                .call1(py, (values.to_vec(), op))
                .and_then(|r| r.extract(py))
        })
        .map_err(|e| VppoError::Kernel(format!("the process group's {op} failed: {e}")))?;
        if out.len() != want {
            return Err(VppoError::Kernel(format!(
                "the process group's {op} returned {} values for {} ranks of {}",
                out.len(),
                self.size,
                values.len()
            )));
        }
        Ok(out)
    }
}

impl Collective for PyGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, values: &mut [f64], op: ReduceOp) -> vppo::Result<()> {
        let op = match op {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
        };
        let reduced = self.call(values, op, values.len())?;
        values.copy_from_slice(&reduced);
        Ok(())
    }
    fn all_gather(&self, values: &[f64]) -> vppo::Result<Vec<f64>> {
        self.call(values, "gather", values.len() * self.size)
    }
}

/// The groups of one forward call (SPEC 11): each layout's, absent where it is not used.
struct Groups {
    data: Option<PyGroup>,
    vocab: Option<PyGroup>,
    seq: Option<PyGroup>,
}

impl Groups {
    /// The groups of a call from the Python reducers.
    fn of(
        data: Option<(usize, usize, Py<PyAny>)>,
        vocab: Option<(usize, usize, Py<PyAny>)>,
        seq: Option<(usize, usize, Py<PyAny>)>,
    ) -> Groups {
        let g = |g: Option<(usize, usize, Py<PyAny>)>| {
            g.map(|(rank, size, reduce)| PyGroup { rank, size, reduce })
        };
        Groups {
            data: g(data),
            vocab: g(vocab),
            seq: g(seq),
        }
    }

    /// Each layout's group comes with its argument: the vocabulary group with this rank's shard
    /// (start, V), the sequence group with whether this rank continues the previous one.
    fn check_layout(
        &self,
        vocab_shard: Option<(usize, usize)>,
        seq_continues: Option<bool>,
    ) -> PyResult<()> {
        match (&self.vocab, vocab_shard, &self.seq, seq_continues) {
            (Some(_), None, ..) | (None, Some(_), ..) => {
                Err(bad("vocab_group and vocab_shard go together".into()))
            }
            (.., Some(_), None) | (.., None, Some(_)) => {
                Err(bad("seq_group and seq_continues go together".into()))
            }
            _ => Ok(()),
        }
    }

    /// `e`, after telling each group that this rank failed before the reductions, in the order the
    /// crate runs their first rounds (vocabulary, sequence, data), so that no other rank waits for
    /// it (`vppo::parallel::report_failure`).
    fn fail(&self, py: Python<'_>, e: PyErr) -> PyErr {
        for g in [&self.vocab, &self.seq, &self.data].into_iter().flatten() {
            if let Err(collective) = py.detach(|| vppo::parallel::report_failure(g)) {
                return value_error(collective);
            }
        }
        e
    }
}

/// Takes part in a data-parallel call as a rank that failed before it (vppo/torch.py's own checks
/// raised): see [`Groups::fail`].
#[pyfunction]
fn report_failure(py: Python<'_>, rank: usize, size: usize, reduce: Py<PyAny>) -> PyResult<()> {
    let g = PyGroup { rank, size, reduce };
    py.detach(|| vppo::parallel::report_failure(&g))
        .map_err(value_error)
}

/// The forward pass: fills the 13 output buffers `out` (per token: score, kl, k3, entropy, logp,
/// logp_masked, lse, lse_masked as f32, mask as u8, dlogp as f32; per response: sbar f32, k i32,
/// alpha f32) and returns (loss, pg_loss, token_normalizer, clip_fraction, mean_ratio,
/// selected_fraction, kl_loss). `ref_logp` ([N] f32) is the KL penalty's (SPEC section 12). Nothing
/// is written when the crate returns an error.
#[pyfunction]
#[pyo3(signature = (device, options, dtype, vocab, logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows, masked_rows, out, group=None, vocab_shard=None, ref_logp=None, seq_continues=None, vocab_group=None, seq_group=None, ref_logits=None, full_out=None))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    device: &str,
    options: &str,
    dtype: &str,
    vocab: usize,
    logits: Raw,
    logits_masked: Raw,
    targets: Raw,
    old_logp: Raw,
    advantages: Raw,
    cu_seqlens: Raw,
    rows: Option<Raw>,
    masked_rows: Option<Raw>,
    out: Vec<Raw>,
    group: Option<(usize, usize, Py<PyAny>)>,
    vocab_shard: Option<(usize, usize)>,
    ref_logp: Option<Raw>,
    seq_continues: Option<bool>,
    vocab_group: Option<(usize, usize, Py<PyAny>)>,
    seq_group: Option<(usize, usize, Py<PyAny>)>,
    ref_logits: Option<Raw>,
    full_out: Option<Raw>,
) -> PyResult<(f64, f64, f64, f64, f64, f64, f64)> {
    // `ref_logits` (the logits' dtype and shape) is `kl_penalty = full`'s; `full_out` ([3, N] f32)
    // then receives the per-token lse_ref, ref_kl and dref_kl its backward needs (SPEC section 12).
    // `group` is the data group, `vocab_group` (with vocab_shard: start, V) the vocabulary group,
    // `seq_group` (with seq_continues: whether this rank's first response continues the previous
    // rank's) the sequence group (SPEC 11); any of them may be absent.
    let groups = Groups::of(group, vocab_group, seq_group);
    let vppo = match build(device, options) {
        Ok(v) => v,
        Err(e) => return Err(groups.fail(py, e)),
    };
    if let Err(e) = groups.check_layout(vocab_shard, seq_continues) {
        return Err(groups.fail(py, e));
    }
    let checked = forward_checks(
        vocab,
        &logits,
        &logits_masked,
        &targets,
        &old_logp,
        &advantages,
        &rows,
        &masked_rows,
        &ref_logp,
        &out,
    );
    if let Err(e) = checked {
        return Err(groups.fail(py, e));
    }

    let dtype = parse_dtype(dtype).map_err(|e| groups.fail(py, e))?;
    let result = py.detach(|| {
        // SAFETY: vppo/torch.py passes contiguous CPU tensors of these dtypes and element counts,
        // alive for the call (they are arguments of the op), and nothing else runs on them meanwhile.
        let batch = unsafe {
            Batch {
                logits: crate::logits(dtype, logits),
                logits_masked: crate::logits(dtype, logits_masked),
                targets: slice::<i32>(targets),
                old_logp: slice::<f32>(old_logp),
                advantages: slice::<f32>(advantages),
                cu_seqlens: slice::<i32>(cu_seqlens),
                vocab,
                rows: rows.map(|r| slice::<i64>(r)),
                masked_rows: masked_rows.map(|r| slice::<i64>(r)),
                ref_logp: ref_logp.map(|r| slice::<f32>(r)),
                ref_logits: ref_logits.map(|r| crate::logits(dtype, r)),
            }
        };
        let data = groups.data.as_ref();
        match (&groups.vocab, vocab_shard, &groups.seq, seq_continues) {
            (Some(v), Some((start, total)), Some(s), Some(c)) => {
                let at = VocabShard { start, total };
                let data = data.map(|d| d as &dyn Collective);
                vppo.forward_vocab_sequence_parallel(&batch, at, c, v, s, data)
            }
            (Some(v), Some((start, total)), _, _) => {
                let at = VocabShard { start, total };
                match data {
                    Some(d) => vppo.forward_vocab_data_parallel(&batch, at, v, d),
                    None => vppo.forward_vocab_parallel(&batch, at, v),
                }
            }
            (_, _, Some(s), Some(c)) => match data {
                Some(d) => vppo.forward_sequence_data_parallel(&batch, c, s, d),
                None => vppo.forward_sequence_parallel(&batch, c, s),
            },
            _ => match data {
                Some(d) => vppo.forward_data_parallel(&batch, d).map(|(o, _)| o),
                None => vppo.forward(&batch),
            },
        }
    });
    let o = result.map_err(value_error)?;
    let cols = OutputColumns::of(&o)?;
    for (src, dst) in cols.floats {
        want_len("an output", src.len(), out[dst].1)?;
        // SAFETY: out[i] are fresh torch.empty buffers of this dtype and count, owned by the call.
        unsafe { slice_mut::<f32>(out[dst]) }.copy_from_slice(src);
    }
    want_len("mask", cols.mask.len(), out[MASK].1)?;
    // SAFETY: as above, a uint8 buffer of N elements.
    unsafe { slice_mut::<u8>(out[MASK]) }.copy_from_slice(cols.mask);
    want_len("k", cols.k.len(), out[K].1)?;
    // SAFETY: as above, an int32 buffer of B elements.
    unsafe { slice_mut::<i32>(out[K]) }.copy_from_slice(&cols.k);
    if let Some(f) = full_out {
        let t = &o.tokens;
        let n = t.logp.len();
        want_len("the full KL's saved tensors", f.1, 3 * n)?;
        // SAFETY: a fresh torch.zeros float32 buffer of 3N elements, owned by the call.
        let dst = unsafe { slice_mut::<f32>(f) };
        // Empty (zeros left) unless kl_penalty = full computed them.
        for (i, src) in [&t.lse_ref, &t.ref_kl, &t.dref_kl].into_iter().enumerate() {
            if !src.is_empty() {
                want_len("a full KL output", src.len(), n)?;
                dst[i * n..(i + 1) * n].copy_from_slice(src);
            }
        }
    }
    Ok(scalars(&o))
}

/// Where the mask and k go among the 13 output buffers of [`forward`] (the rest are f32).
const MASK: usize = 8;
const K: usize = 11;

/// The 13 outputs of a forward in the order of [`forward`]'s `out`: the f32 ones with the index of
/// their buffer, the mask, and k as int32.
struct OutputColumns<'a> {
    floats: [(&'a [f32], usize); 11],
    mask: &'a [u8],
    k: Vec<i32>,
}

impl<'a> OutputColumns<'a> {
    fn of(o: &'a vppo::VppoOutput) -> PyResult<OutputColumns<'a>> {
        let t = &o.tokens;
        let r = &o.responses;
        let k =
            r.k.iter()
                .map(|&s| i32::try_from(s).map_err(|_| bad(format!("k = {s} does not fit int32"))))
                .collect::<PyResult<Vec<i32>>>()?;
        Ok(OutputColumns {
            floats: [
                (&t.score, 0),
                (&t.kl, 1),
                (&t.k3, 2),
                (&t.entropy, 3),
                (&t.logp, 4),
                (&t.logp_masked, 5),
                (&t.lse, 6),
                (&t.lse_masked, 7),
                (&t.dlogp, 9),
                (&r.sbar, 10),
                (&r.alpha, 12),
            ],
            mask: &t.mask,
            k,
        })
    }
}

/// (loss, pg_loss, token_normalizer, clip_fraction, mean_ratio, selected_fraction, kl_loss).
fn scalars(o: &vppo::VppoOutput) -> (f64, f64, f64, f64, f64, f64, f64) {
    let s = &o.stats;
    (
        o.loss,
        o.pg_loss,
        o.token_normalizer,
        s.clip_fraction,
        s.mean_ratio,
        s.selected_fraction,
        o.kl_loss,
    )
}

/// dloss/dlogits from what the forward saved (`Vppo::backward_saved`): reads `logits` and writes
/// `grad` (`grad_dtype` float32 or the logits dtype, the shape of the logits), or, with `logits`
/// None, reads the logits from `grad` and overwrites them with the gradient (in place). `dlogp`
/// is the forward's dloss/dlogp already scaled by the incoming gradient of the loss.
#[pyfunction]
#[pyo3(signature = (device, options, dtype, vocab, logits, grad_dtype, grad, targets, lse, dlogp, rows, vocab_shard=None, ref_logits=None, full=None))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    device: &str,
    options: &str,
    dtype: &str,
    vocab: usize,
    logits: Option<Raw>,
    grad_dtype: &str,
    grad: Raw,
    targets: Raw,
    lse: Raw,
    dlogp: Raw,
    rows: Option<Raw>,
    vocab_shard: Option<(usize, usize)>,
    ref_logits: Option<Raw>,
    full: Option<Raw>,
) -> PyResult<()> {
    // With `ref_logits`, `full` is the forward's [3, N] lse_ref, ref_kl and dref_kl (the last
    // scaled by the incoming gradient of the loss): `kl_penalty = full`'s backward.
    let vppo = build(device, options)?;
    let dtype = parse_dtype(dtype)?;
    let grad_dtype = parse_dtype(grad_dtype)?;
    if logits.is_none() && grad_dtype != dtype {
        return Err(bad(format!(
            "the in-place gradient has the logits dtype {}, not {}",
            dtype.name(),
            grad_dtype.name()
        )));
    }
    let n = targets.1;
    want_len("lse", lse.1, n)?;
    want_len("dlogp", dlogp.1, n)?;
    if let Some(r) = rows {
        want_len("rows", r.1, n)?;
    }
    if let Some(l) = logits {
        want_len("grad_logits", grad.1, l.1)?;
    }
    rows_of("grad_logits", grad.1, vocab)?;
    let full = match (ref_logits, full) {
        (Some(r), Some(f)) => {
            want_len("the full KL's saved tensors", f.1, 3 * n)?;
            Some((r, f))
        }
        (None, None) => None,
        _ => {
            return Err(bad(
                "ref_logits and the full KL's saved tensors go together".into(),
            ))
        }
    };
    py.detach(|| {
        // SAFETY: vppo/torch.py passes contiguous CPU tensors of these dtypes and counts, alive for
        // the call; `grad` is a fresh torch.empty buffer or (in place, `logits` None) the logits the
        // op declares it mutates, and no other slice of it exists here.
        // The full KL's: ref_logits of the logits' dtype and count, and 3N f32 (checked above).
        let full = full.map(|(r, f)| unsafe {
            let f = slice::<f32>(f);
            vppo::FullKlSaved {
                ref_logits: crate::logits(dtype, r),
                lse_ref: &f[..n],
                ref_kl: &f[n..2 * n],
                dref_kl: &f[2 * n..],
            }
        });
        // SAFETY: as above.
        let (logits, grad, saved) = unsafe {
            (
                logits.map(|l| crate::logits(dtype, l)),
                grad_mut(grad_dtype, grad),
                SavedForward {
                    targets: slice::<i32>(targets),
                    lse: slice::<f32>(lse),
                    dlogp: slice::<f32>(dlogp),
                    rows: rows.map(|r| slice::<i64>(r)),
                },
            )
        };
        if let Some(full) = &full {
            if vocab_shard.is_some() {
                return Err(VppoError::Shape {
                    tensor: vppo::Tensor::RefLogits,
                    detail: "kl_penalty = full is not combined with a vocabulary shard".into(),
                });
            }
            return vppo.backward_saved_full(logits, vocab, &saved, full, grad);
        }
        match (vocab_shard, logits) {
            (Some((start, total)), Some(logits)) => vppo.backward_saved_vocab_parallel(
                logits,
                vocab,
                VocabShard { start, total },
                &saved,
                grad,
            ),
            (Some(_), None) => Err(VppoError::Shape {
                tensor: vppo::Tensor::GradLogits,
                detail: "a vocabulary shard's backward is not in place".into(),
            }),
            (None, logits) => vppo.backward_saved(logits, vocab, &saved, grad),
        }
    })
    .map_err(value_error)
}

/// The executor of the KL op for CPU tensors.
fn kl_op(device: &str, temperature: f64) -> PyResult<KlDiv> {
    KlDiv::new(temperature, cpu_device(device)?).map_err(value_error)
}

/// The KL op's batch at these buffers.
///
/// # Safety
/// As [`slice`]: each buffer holds its count of initialized elements (of `dtype` for the logits,
/// i64 for the indices) that nothing writes while the batch lives.
unsafe fn kl_batch<'a>(
    dtype: Dtype,
    vocab: usize,
    p_logits: Raw,
    q_logits: Raw,
    p_rows: Option<Raw>,
    q_rows: Option<Raw>,
) -> KlBatch<'a> {
    // SAFETY: forwarded from the caller.
    unsafe {
        KlBatch {
            p_logits: logits(dtype, p_logits),
            q_logits: logits(dtype, q_logits),
            vocab,
            p_rows: p_rows.map(|r| slice::<i64>(r)),
            q_rows: q_rows.map(|r| slice::<i64>(r)),
        }
    }
}

/// `vppo.torch.kl`'s forward (SPEC section 13): KL(p || q) [N] into `kl`, with the lse of both rows
/// into `lse_p` and `lse_q` (each [N] f32, N the tokens of the batch). Nothing is written when the
/// crate returns an error.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kl_forward(
    py: Python<'_>,
    device: &str,
    temperature: f64,
    dtype: &str,
    vocab: usize,
    p_logits: Raw,
    q_logits: Raw,
    p_rows: Option<Raw>,
    q_rows: Option<Raw>,
    kl: Raw,
    lse_p: Raw,
    lse_q: Raw,
) -> PyResult<()> {
    let op = kl_op(device, temperature)?;
    let dtype = parse_dtype(dtype)?;
    py.detach(|| {
        // SAFETY: vppo/torch.py passes contiguous CPU tensors of these dtypes and counts, alive for
        // the call, and fresh torch.empty float32 buffers for the three outputs.
        let batch = unsafe { kl_batch(dtype, vocab, p_logits, q_logits, p_rows, q_rows) };
        batch.validate()?;
        let n = batch.n_tokens();
        for (tensor, o) in [
            (Tensor::Kl, kl),
            (Tensor::LseP, lse_p),
            (Tensor::LseQ, lse_q),
        ] {
            if o.1 != n {
                return Err(VppoError::Shape {
                    tensor,
                    detail: format!("has {} elements, expected N = {n}", o.1),
                });
            }
        }
        let out = op.forward(&batch)?;
        for (o, x) in [(kl, &out.kl), (lse_p, &out.lse_p), (lse_q, &out.lse_q)] {
            // SAFETY: a fresh float32 buffer of N elements (checked above), written only here.
            unsafe { slice_mut::<f32>(o) }.copy_from_slice(x);
        }
        Ok(())
    })
    .map_err(value_error)
}

/// `vppo.torch.kl`'s backward: the gradient of sum_t grad_kl[t] kl_t into `grad_p` and `grad_q`
/// (the shapes and dtype of the two logits tensors), from the forward's kl, lse_p and lse_q.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kl_backward(
    py: Python<'_>,
    device: &str,
    temperature: f64,
    dtype: &str,
    vocab: usize,
    p_logits: Raw,
    q_logits: Raw,
    p_rows: Option<Raw>,
    q_rows: Option<Raw>,
    kl: Raw,
    lse_p: Raw,
    lse_q: Raw,
    grad_kl: Raw,
    grad_p: Raw,
    grad_q: Raw,
) -> PyResult<()> {
    let op = kl_op(device, temperature)?;
    let dtype = parse_dtype(dtype)?;
    py.detach(|| {
        // SAFETY: vppo/torch.py passes contiguous CPU tensors of these dtypes and counts, alive for
        // the call; grad_p and grad_q are fresh torch.empty buffers of the logits' dtype, distinct
        // from every input, and no other slice of them exists here.
        let (batch, saved, grad_kl, grad_p, grad_q) = unsafe {
            (
                kl_batch(dtype, vocab, p_logits, q_logits, p_rows, q_rows),
                KlSaved {
                    kl: slice::<f32>(kl),
                    lse_p: slice::<f32>(lse_p),
                    lse_q: slice::<f32>(lse_q),
                },
                slice::<f32>(grad_kl),
                grad_mut(dtype, grad_p),
                grad_mut(dtype, grad_q),
            )
        };
        op.backward(&batch, &saved, grad_kl, grad_p, grad_q)
    })
    .map_err(value_error)
}

// -------------------------------------------------------------------------------------------------
// CUDA tensors: the caller's device memory used in place, ordered on the caller's stream
// -------------------------------------------------------------------------------------------------

/// A CUDA tensor as Python passes it: its device address and element count.
type DeviceRaw = (u64, usize);

/// The caller's device buffer `raw` as a slice of `T` on `gpu` (never freed by us).
///
/// # Safety
/// `raw` must be a live allocation of `raw.1` elements of `T` on `gpu`'s device (a contiguous torch
/// CUDA tensor of that dtype and count, alive for the call), or have `raw.1` = 0.
unsafe fn borrow<T>(gpu: &Gpu, raw: DeviceRaw) -> Borrowed<T> {
    // SAFETY: forwarded from the caller.
    unsafe { Borrowed::new(gpu, raw.0, raw.1) }
}

/// Logits of `dtype` at `raw`, borrowed; see [`borrow`].
enum BorrowedLogits {
    F32(Borrowed<f32>),
    F16(Borrowed<f16>),
    Bf16(Borrowed<bf16>),
}

impl BorrowedLogits {
    /// # Safety
    /// As [`borrow`] for the element type of `dtype`.
    unsafe fn new(gpu: &Gpu, dtype: Dtype, raw: DeviceRaw) -> BorrowedLogits {
        // SAFETY: forwarded from the caller.
        unsafe {
            match dtype {
                Dtype::F32 => BorrowedLogits::F32(borrow(gpu, raw)),
                Dtype::F16 => BorrowedLogits::F16(borrow(gpu, raw)),
                Dtype::Bf16 => BorrowedLogits::Bf16(borrow(gpu, raw)),
            }
        }
    }

    fn view(&self) -> DeviceLogits<'_> {
        match self {
            BorrowedLogits::F32(x) => DeviceLogits::F32(x),
            BorrowedLogits::F16(x) => DeviceLogits::F16(x),
            BorrowedLogits::Bf16(x) => DeviceLogits::Bf16(x),
        }
    }

    fn view_mut(&mut self) -> DeviceLogitsMut<'_> {
        match self {
            BorrowedLogits::F32(x) => DeviceLogitsMut::F32(x),
            BorrowedLogits::F16(x) => DeviceLogitsMut::F16(x),
            BorrowedLogits::Bf16(x) => DeviceLogitsMut::Bf16(x),
        }
    }
}

/// 3N, the element count of the full KL's [3, N] saved tensors, checked.
fn three_n(n: usize) -> PyResult<usize> {
    n.checked_mul(3).ok_or_else(|| {
        bad(format!(
            "the full KL's saved tensors: 3 N = 3 * {n} overflows"
        ))
    })
}

/// The address of row `i` of a [rows, n] float32 tensor at `base`: base + 4 i n, checked (an error,
/// never a wrapped address).
fn f32_row_address(base: u64, i: usize, n: usize) -> PyResult<u64> {
    4usize
        .checked_mul(i)
        .and_then(|x| x.checked_mul(n))
        .and_then(|x| base.checked_add(x as u64))
        .ok_or_else(|| bad(format!("row {i} of a [3, {n}] float32 tensor overflows an address")))
}

/// The GPU `ordinal`, with `stream` (torch's current stream there, a raw `cudaStream_t`) joined: our
/// work is queued after what the caller queued so far.
///
/// # Safety
/// `stream` must be 0 or a live stream of the primary context of GPU `ordinal`.
unsafe fn gpu_after(ordinal: usize, stream: u64) -> vppo::Result<std::sync::Arc<Gpu>> {
    let gpu = Gpu::new(ordinal)?;
    // SAFETY: forwarded from the caller.
    unsafe { gpu.wait_for_foreign_stream(stream) }?;
    Ok(gpu)
}

/// [`forward`] on CUDA tensors of GPU `ordinal`: every argument is a device buffer, used in place;
/// the 13 outputs are device buffers (torch.empty on the device) that this fills. `stream` is
/// torch's current stream: the work is ordered after what is queued there, and what is queued there
/// afterwards sees the outputs (the call also synchronizes: it copies the O(N + B) tensors back once
/// for validation, as `Vppo::forward_device` does). `group` is the data group (SPEC 11,
/// `Vppo::forward_device_data_parallel`): a few scalars cross it, through the Python reducer (NCCL
/// or gloo), and an error on this rank before its reductions is reported to it first; so are
/// `vocab_group` (with `vocab_shard`) and `seq_group` (with `seq_continues`), as for [`forward`]:
/// pass 1 runs on the GPU, its partial states or per-token values come back (O(N)), and the merge
/// and pass 2 run on the host, the same on every rank.
#[pyfunction]
#[pyo3(signature = (ordinal, stream, options, dtype, vocab, logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows, masked_rows, out, ref_logp=None, group=None, ref_logits=None, full_out=None, vocab_shard=None, seq_continues=None, vocab_group=None, seq_group=None))]
#[allow(clippy::too_many_arguments)]
fn forward_cuda(
    py: Python<'_>,
    ordinal: usize,
    stream: u64,
    options: &str,
    dtype: &str,
    vocab: usize,
    logits: DeviceRaw,
    logits_masked: DeviceRaw,
    targets: DeviceRaw,
    old_logp: DeviceRaw,
    advantages: DeviceRaw,
    cu_seqlens: DeviceRaw,
    rows: Option<DeviceRaw>,
    masked_rows: Option<DeviceRaw>,
    out: Vec<DeviceRaw>,
    ref_logp: Option<DeviceRaw>,
    group: Option<(usize, usize, Py<PyAny>)>,
    ref_logits: Option<DeviceRaw>,
    full_out: Option<DeviceRaw>,
    vocab_shard: Option<(usize, usize)>,
    seq_continues: Option<bool>,
    vocab_group: Option<(usize, usize, Py<PyAny>)>,
    seq_group: Option<(usize, usize, Py<PyAny>)>,
) -> PyResult<(f64, f64, f64, f64, f64, f64, f64)> {
    // `ref_logits` and `full_out` ([3, N] f32: lse_ref, ref_kl, dref_kl) as in [`forward`].
    let groups = Groups::of(group, vocab_group, seq_group);
    let vppo = build_on(Device::Cuda(ordinal), options).map_err(|e| groups.fail(py, e))?;
    groups
        .check_layout(vocab_shard, seq_continues)
        .map_err(|e| groups.fail(py, e))?;
    let host = |r: &DeviceRaw| (r.0 as usize, r.1);
    forward_checks(
        vocab,
        &host(&logits),
        &host(&logits_masked),
        &host(&targets),
        &host(&old_logp),
        &host(&advantages),
        &rows.as_ref().map(host),
        &masked_rows.as_ref().map(host),
        &ref_logp.as_ref().map(host),
        &out.iter().map(host).collect::<Vec<_>>(),
    )
    .map_err(|e| groups.fail(py, e))?;
    let dtype = parse_dtype(dtype).map_err(|e| groups.fail(py, e))?;
    let n = targets.1;
    if let Some(f) = full_out {
        three_n(n)
            .and_then(|len| want_len("the full KL's saved tensors", f.1, len))
            .map_err(|e| groups.fail(py, e))?;
    }
    let gpu = py
        .detach(|| {
            // SAFETY: vppo/torch.py passes torch's current stream of this device.
            unsafe { gpu_after(ordinal, stream) }
        })
        .map_err(|e| groups.fail(py, value_error(e)))?;
    py.detach(|| -> PyResult<_> {
        // SAFETY: vppo/torch.py passes contiguous CUDA tensors of device `ordinal` with these dtypes
        // and element counts (checked above against each other), alive for the call; the outputs are
        // fresh torch.empty buffers nothing else uses.
        let (a, b, t, o, adv, cu, r, mr, rl) = unsafe {
            (
                BorrowedLogits::new(&gpu, dtype, logits),
                BorrowedLogits::new(&gpu, dtype, logits_masked),
                borrow::<i32>(&gpu, targets),
                borrow::<f32>(&gpu, old_logp),
                borrow::<f32>(&gpu, advantages),
                borrow::<i32>(&gpu, cu_seqlens),
                rows.map(|x| borrow::<i64>(&gpu, x)),
                masked_rows.map(|x| borrow::<i64>(&gpu, x)),
                ref_logp.map(|x| borrow::<f32>(&gpu, x)),
            )
        };
        // SAFETY: as above (ref_logits a CUDA tensor of the logits' dtype; the crate checks its count).
        let rf = ref_logits.map(|x| unsafe { BorrowedLogits::new(&gpu, dtype, x) });
        let batch = DeviceBatch {
            logits: a.view(),
            logits_masked: b.view(),
            targets: &t,
            old_logp: &o,
            advantages: &adv,
            cu_seqlens: &cu,
            vocab,
            ref_logp: rl.as_deref(),
            rows: r.as_deref(),
            masked_rows: mr.as_deref(),
            ref_logits: rf.as_ref().map(|x| x.view()),
        };
        let data = groups.data.as_ref().map(|d| d as &dyn Collective);
        let output = match (&groups.vocab, vocab_shard, &groups.seq, seq_continues) {
            (Some(v), Some((start, total)), Some(s), Some(c)) => {
                let at = VocabShard { start, total };
                vppo.forward_device_vocab_sequence_parallel(&batch, at, c, v, s, data)
            }
            (Some(v), Some((start, total)), _, _) => {
                let at = VocabShard { start, total };
                vppo.forward_device_vocab_parallel(&batch, at, v, data)
            }
            (_, _, Some(s), Some(c)) => vppo.forward_device_sequence_parallel(&batch, c, s, data),
            _ => match data {
                Some(d) => vppo
                    .forward_device_data_parallel(&batch, d)
                    .map(|(f, _)| f.output),
                None => vppo.forward_device(&batch).map(|f| f.output),
            },
        }
        .map_err(value_error)?;
        let cols = OutputColumns::of(&output)?;
        let upload_err = |e: VppoError| value_error(e);
        // Every length first, so that nothing is written when one is wrong.
        for (src, dst) in &cols.floats {
            want_len("an output", src.len(), out[*dst].1)?;
        }
        want_len("mask", cols.mask.len(), out[MASK].1)?;
        want_len("k", cols.k.len(), out[K].1)?;
        let t = &output.tokens;
        let full_rows = [&t.lse_ref, &t.ref_kl, &t.dref_kl];
        if full_out.is_some() {
            for src in full_rows.iter().filter(|x| !x.is_empty()) {
                want_len("a full KL output", src.len(), n)?;
            }
        }
        for (src, dst) in cols.floats {
            // SAFETY: out[dst] is a fresh f32 CUDA tensor of this count (checked).
            let mut d = unsafe { borrow::<f32>(&gpu, out[dst]) };
            gpu.upload_into(src, &mut d).map_err(upload_err)?;
        }
        want_len("mask", cols.mask.len(), out[MASK].1)?;
        // SAFETY: a fresh uint8 CUDA tensor of N elements.
        let mut d = unsafe { borrow::<u8>(&gpu, out[MASK]) };
        gpu.upload_into(cols.mask, &mut d).map_err(upload_err)?;
        want_len("k", cols.k.len(), out[K].1)?;
        // SAFETY: a fresh int32 CUDA tensor of B elements.
        let mut d = unsafe { borrow::<i32>(&gpu, out[K]) };
        gpu.upload_into(&cols.k, &mut d).map_err(upload_err)?;
        if let Some(f) = full_out {
            // Empty (torch.zeros left) unless kl_penalty = full computed them.
            for (i, src) in full_rows.into_iter().enumerate() {
                if src.is_empty() {
                    continue;
                }
                let at = f32_row_address(f.0, i, n)?;
                // SAFETY: row i of the fresh [3, N] float32 CUDA tensor `full_out` (3N elements,
                // checked): N elements at byte offset 4 i N.
                let mut d = unsafe { borrow::<f32>(&gpu, (at, n)) };
                gpu.upload_into(src, &mut d).map_err(upload_err)?;
            }
        }
        // SAFETY: as gpu_after.
        unsafe { gpu.order_foreign_stream_after(stream) }.map_err(value_error)?;
        gpu.synchronize().map_err(value_error)?;
        Ok(scalars(&output))
    })
}

/// [`backward`] on CUDA tensors of GPU `ordinal` (`Vppo::backward_saved_device`): `logits` None
/// means in place over `grad`. Ordered after torch's current stream `stream`, and synchronized.
#[pyfunction]
#[pyo3(signature = (ordinal, stream, options, dtype, vocab, logits, grad_dtype, grad, targets, lse, dlogp, rows, ref_logits=None, full=None, vocab_shard=None))]
#[allow(clippy::too_many_arguments)]
fn backward_cuda(
    py: Python<'_>,
    ordinal: usize,
    stream: u64,
    options: &str,
    dtype: &str,
    vocab: usize,
    logits: Option<DeviceRaw>,
    grad_dtype: &str,
    grad: DeviceRaw,
    targets: DeviceRaw,
    lse: DeviceRaw,
    dlogp: DeviceRaw,
    rows: Option<DeviceRaw>,
    ref_logits: Option<DeviceRaw>,
    full: Option<DeviceRaw>,
    vocab_shard: Option<(usize, usize)>,
) -> PyResult<()> {
    // With `ref_logits`, `full` is the forward's [3, N] lse_ref, ref_kl and dref_kl (the last scaled
    // by the incoming gradient of the loss): `kl_penalty = full`'s backward, as in [`backward`].
    let vppo = build_on(Device::Cuda(ordinal), options)?;
    let dtype = parse_dtype(dtype)?;
    let grad_dtype = parse_dtype(grad_dtype)?;
    if logits.is_none() && grad_dtype != dtype {
        return Err(bad(format!(
            "the in-place gradient has the logits dtype {}, not {}",
            dtype.name(),
            grad_dtype.name()
        )));
    }
    if let Some(l) = logits {
        want_len("grad_logits", grad.1, l.1)?;
    }
    rows_of("grad_logits", grad.1, vocab)?;
    let n = targets.1;
    let full = match (ref_logits, full) {
        (Some(r), Some(f)) => {
            want_len("the full KL's saved tensors", f.1, three_n(n)?)?;
            let rows = [
                f32_row_address(f.0, 0, n)?,
                f32_row_address(f.0, 1, n)?,
                f32_row_address(f.0, 2, n)?,
            ];
            Some((r, rows))
        }
        (None, None) => None,
        _ => {
            return Err(bad(
                "ref_logits and the full KL's saved tensors go together".into(),
            ))
        }
    };
    py.detach(|| {
        // SAFETY: vppo/torch.py passes torch's current stream of this device.
        let gpu = unsafe { gpu_after(ordinal, stream) }?;
        // SAFETY: ref_logits a CUDA tensor of the logits' dtype (the crate checks its count), and
        // full a [3, N] float32 CUDA tensor (3N elements, checked): its rows at byte offsets 0, 4N
        // and 8N, N elements each; all alive for the call and only read.
        let full = full.map(|(r, rows)| unsafe {
            (
                BorrowedLogits::new(&gpu, dtype, r),
                rows.map(|at| borrow::<f32>(&gpu, (at, n))),
            )
        });
        // SAFETY: contiguous CUDA tensors of device `ordinal` with these dtypes and counts, alive
        // for the call; `grad` is a fresh torch.empty buffer or (in place) the logits the op declares
        // it mutates, and no other view of it exists here.
        let (x, mut g, t, l, d, r) = unsafe {
            (
                logits.map(|x| BorrowedLogits::new(&gpu, dtype, x)),
                BorrowedLogits::new(&gpu, grad_dtype, grad),
                borrow::<i32>(&gpu, targets),
                borrow::<f32>(&gpu, lse),
                borrow::<f32>(&gpu, dlogp),
                rows.map(|x| borrow::<i64>(&gpu, x)),
            )
        };
        let saved = DeviceSaved {
            targets: &t,
            lse: &l,
            dlogp: &d,
            rows: r.as_deref(),
        };
        match (&full, vocab_shard, &x) {
            (Some((r, [lse_ref, ref_kl, dref_kl])), None, _) => {
                let full = DeviceFullKlSaved {
                    ref_logits: r.view(),
                    lse_ref,
                    ref_kl,
                    dref_kl,
                };
                let logits = x.as_ref().map(|x| x.view());
                vppo.backward_saved_full_device(logits, vocab, &saved, &full, g.view_mut())?
            }
            (Some(_), Some(_), _) => {
                return Err(VppoError::Shape {
                    tensor: vppo::Tensor::RefLogits,
                    detail: "kl_penalty = full is not combined with a vocabulary shard".into(),
                })
            }
            (None, Some((start, total)), Some(x)) => vppo.backward_saved_device_vocab_parallel(
                x.view(),
                vocab,
                VocabShard { start, total },
                &saved,
                g.view_mut(),
            )?,
            (None, Some(_), None) => {
                return Err(VppoError::Shape {
                    tensor: vppo::Tensor::GradLogits,
                    detail: "a vocabulary shard's backward is not in place".into(),
                })
            }
            (None, None, _) => vppo.backward_saved_device(
                x.as_ref().map(|x| x.view()),
                vocab,
                &saved,
                g.view_mut(),
            )?,
        }
        // SAFETY: as gpu_after.
        unsafe { gpu.order_foreign_stream_after(stream) }
    })
    .map_err(value_error)
}

/// The KL op's batch at the caller's device buffers, borrowed; see [`borrow`].
struct BorrowedKl {
    p_logits: BorrowedLogits,
    q_logits: BorrowedLogits,
    p_rows: Option<Borrowed<i64>>,
    q_rows: Option<Borrowed<i64>>,
    vocab: usize,
}

impl BorrowedKl {
    /// # Safety
    /// As [`borrow`] for each buffer: the logits of `dtype`, the indices i64.
    unsafe fn new(
        gpu: &Gpu,
        dtype: Dtype,
        vocab: usize,
        p_logits: DeviceRaw,
        q_logits: DeviceRaw,
        p_rows: Option<DeviceRaw>,
        q_rows: Option<DeviceRaw>,
    ) -> BorrowedKl {
        // SAFETY: forwarded from the caller.
        unsafe {
            BorrowedKl {
                p_logits: BorrowedLogits::new(gpu, dtype, p_logits),
                q_logits: BorrowedLogits::new(gpu, dtype, q_logits),
                p_rows: p_rows.map(|r| borrow(gpu, r)),
                q_rows: q_rows.map(|r| borrow(gpu, r)),
                vocab,
            }
        }
    }

    fn batch(&self) -> DeviceKlBatch<'_> {
        DeviceKlBatch {
            p_logits: self.p_logits.view(),
            q_logits: self.q_logits.view(),
            vocab: self.vocab,
            p_rows: self.p_rows.as_deref(),
            q_rows: self.q_rows.as_deref(),
        }
    }
}

/// The KL op for CUDA tensors of GPU `ordinal`.
fn kl_op_cuda(ordinal: usize, temperature: f64) -> PyResult<KlDiv> {
    KlDiv::new(temperature, Device::Cuda(ordinal)).map_err(value_error)
}

/// The element count of a tensor named `name` as a byte count of `size`-byte elements, checked.
fn bytes_of(name: &str, raw: &DeviceRaw, size: usize) -> PyResult<()> {
    raw.1
        .checked_mul(size)
        .map(|_| ())
        .ok_or_else(|| bad(format!("{name}: {} elements overflow", raw.1)))
}

/// [`kl_forward`] on CUDA tensors of GPU `ordinal`, used in place: kl, lse_p and lse_q are device
/// buffers ([N] float32, torch.empty on the device) that this fills. Ordered after torch's current
/// stream `stream` there, and what is queued there afterwards sees the outputs (the call also
/// synchronizes: it copies the O(N) indices and row states back, never a logits row unless one
/// is bad).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kl_forward_cuda(
    py: Python<'_>,
    ordinal: usize,
    stream: u64,
    temperature: f64,
    dtype: &str,
    vocab: usize,
    p_logits: DeviceRaw,
    q_logits: DeviceRaw,
    p_rows: Option<DeviceRaw>,
    q_rows: Option<DeviceRaw>,
    kl: DeviceRaw,
    lse_p: DeviceRaw,
    lse_q: DeviceRaw,
) -> PyResult<()> {
    let op = kl_op_cuda(ordinal, temperature)?;
    let dtype = parse_dtype(dtype)?;
    bytes_of("p_logits", &p_logits, dtype.size())?;
    bytes_of("q_logits", &q_logits, dtype.size())?;
    py.detach(|| -> PyResult<()> {
        // SAFETY: vppo/torch.py passes torch's current stream of this device.
        let gpu = unsafe { gpu_after(ordinal, stream) }.map_err(value_error)?;
        // SAFETY: vppo/torch.py passes contiguous CUDA tensors of device `ordinal` with these dtypes
        // and element counts, alive for the call, that nothing writes meanwhile.
        let b = unsafe { BorrowedKl::new(&gpu, dtype, vocab, p_logits, q_logits, p_rows, q_rows) };
        let out = op.forward_device(&b.batch()).map_err(value_error)?;
        for (name, dst, src) in [
            ("kl", kl, &out.kl),
            ("lse_p", lse_p, &out.lse_p),
            ("lse_q", lse_q, &out.lse_q),
        ] {
            want_len(name, dst.1, src.len())?;
            if src.is_empty() {
                continue;
            }
            // SAFETY: a fresh float32 CUDA tensor of N elements (checked), written only here.
            let mut d = unsafe { borrow::<f32>(&gpu, dst) };
            gpu.upload_into(src, &mut d).map_err(value_error)?;
        }
        // SAFETY: as gpu_after.
        unsafe { gpu.order_foreign_stream_after(stream) }.map_err(value_error)?;
        gpu.synchronize().map_err(value_error)
    })
}

/// [`kl_backward`] on CUDA tensors of GPU `ordinal` (`KlDiv::backward_device`): grad_p and grad_q
/// are fresh device buffers of the logits' shapes and dtype. Ordered after torch's current stream
/// `stream`, and synchronized.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kl_backward_cuda(
    py: Python<'_>,
    ordinal: usize,
    stream: u64,
    temperature: f64,
    dtype: &str,
    vocab: usize,
    p_logits: DeviceRaw,
    q_logits: DeviceRaw,
    p_rows: Option<DeviceRaw>,
    q_rows: Option<DeviceRaw>,
    kl: DeviceRaw,
    lse_p: DeviceRaw,
    lse_q: DeviceRaw,
    grad_kl: DeviceRaw,
    grad_p: DeviceRaw,
    grad_q: DeviceRaw,
) -> PyResult<()> {
    let op = kl_op_cuda(ordinal, temperature)?;
    let dtype = parse_dtype(dtype)?;
    for (name, raw) in [
        ("p_logits", &p_logits),
        ("q_logits", &q_logits),
        ("grad_p", &grad_p),
        ("grad_q", &grad_q),
    ] {
        bytes_of(name, raw, dtype.size())?;
    }
    py.detach(|| {
        // SAFETY: vppo/torch.py passes torch's current stream of this device.
        let gpu = unsafe { gpu_after(ordinal, stream) }?;
        // SAFETY: contiguous CUDA tensors of device `ordinal` with these dtypes and counts, alive
        // for the call; grad_p and grad_q are fresh torch.empty buffers of the logits' dtype,
        // distinct from every input and from each other, and no other view of them exists here.
        let (b, k, lp, lq, u, mut gp, mut gq) = unsafe {
            (
                BorrowedKl::new(&gpu, dtype, vocab, p_logits, q_logits, p_rows, q_rows),
                borrow::<f32>(&gpu, kl),
                borrow::<f32>(&gpu, lse_p),
                borrow::<f32>(&gpu, lse_q),
                borrow::<f32>(&gpu, grad_kl),
                BorrowedLogits::new(&gpu, dtype, grad_p),
                BorrowedLogits::new(&gpu, dtype, grad_q),
            )
        };
        let saved = DeviceKlSaved {
            kl: &k,
            lse_p: &lp,
            lse_q: &lq,
        };
        op.backward_device(&b.batch(), &saved, &u, gp.view_mut(), gq.view_mut())?;
        // SAFETY: as gpu_after.
        unsafe { gpu.order_foreign_stream_after(stream) }
    })
    .map_err(value_error)
}

/// The two callbacks the fake CUDA driver's `vppo_fake_cuda_install` takes, as addresses: the kernel
/// resolver and the params' pointer fields (`vppo::hooks`), for the tests that run the CUDA path on
/// the fake driver (python/tests/test_cuda_fake.py). Not API.
#[pyfunction]
fn _fake_cuda_hooks() -> (usize, usize) {
    (
        vppo::hooks::simt_entry_of_c_name as *const () as usize,
        vppo::hooks::kernel_pointer_fields as *const () as usize,
    )
}

/// Bytes of every buffer the crate has allocated on GPU `ordinal` since it was first used there
/// (`Gpu::allocated_bytes`: never decreased when buffers are freed), so that the difference across a
/// call bounds the device memory the crate took during it; torch's allocator statistics do not see
/// these buffers. RuntimeError without a GPU or driver.
#[pyfunction]
fn cuda_allocated_bytes(ordinal: usize) -> PyResult<u64> {
    Gpu::new(ordinal)
        .map(|gpu| gpu.allocated_bytes())
        .map_err(value_error)
}

/// Checks the loss options without computing anything (ValueError with the crate's message).
#[pyfunction]
fn check_options(device: &str, options: &str) -> PyResult<()> {
    build(device, options).map(|_| ())
}

#[pymodule]
fn _vppo(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(check_options, m)?)?;
    m.add_function(wrap_pyfunction!(report_failure, m)?)?;
    m.add_function(wrap_pyfunction!(forward_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(backward_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(_fake_cuda_hooks, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_allocated_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(kl_forward, m)?)?;
    m.add_function(wrap_pyfunction!(kl_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kl_forward_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(kl_backward_cuda, m)?)?;
    Ok(())
}
