//! The general KL op (`vppo.torch.kl`, SPEC section 13) on the kernels. Forward: the perception
//! kernel (kernels/perception.cu, unchanged) in partial mode with p_logits as `logits` and q_logits
//! as `logits_masked`: per row the online-softmax state of both rows, finished here in f64 into
//! kl, lse_p and lse_q (the formulas of the kernel's epilogue), with the row checks. Backward:
//! kernels/kl_div.cu, both gradients from the saved lse_p, lse_q and kl, one read of each row.
//!
//! The same launches run on the caller's GPU buffers in place ([`DeviceKlBatch`], the Python op's
//! CUDA path): only the O(N) row indices and saved values are copied back, to be checked before any
//! launch, and the O(N) states of the forward, to be finished on the host.
//!
//! Reference: src/reference/kl_div.rs. API: src/kl_div.rs. Tests: tests/kl_div.rs.

use super::resident::{join_caller_streams, residence, Residence};
#[allow(unused_imports)]
use super::*;
use crate::batch::{KlBatch, KlShape};
use crate::params::VppoKlDivBackwardParams;
use crate::reference::kl_div::{
    check_grad, check_grad_buffer, check_token_rows, check_token_values, kl_infinite_column,
};
use cudarc::driver::CudaSlice;

/// The kl = +inf flag of a partial state (kFlagKlInf of kernels/perception.cu).
const KL_INF: u32 = 1;

pub(super) fn kl_div_kernel(dtype: Dtype) -> Kernel<VppoKlDivBackwardParams> {
    match dtype {
        Dtype::F32 => KL_DIV_BACKWARD_F32,
        Dtype::F16 => KL_DIV_BACKWARD_F16,
        Dtype::Bf16 => KL_DIV_BACKWARD_BF16,
    }
}

/// What the KL op's backward reads of its forward, each [N] f32.
#[derive(Debug, Clone, Copy)]
pub struct KlSaved<'a> {
    /// KL(p || q) per token.
    pub kl: &'a [f32],
    /// logsumexp(p_logits[row] / tau).
    pub lse_p: &'a [f32],
    /// logsumexp(q_logits[row] / tau).
    pub lse_q: &'a [f32],
}

impl KlSaved<'_> {
    /// N finite values of each.
    pub fn check(&self, n: usize) -> Result<()> {
        check_token_values(Tensor::Kl, self.kl, n)?;
        check_token_values(Tensor::LseP, self.lse_p, n)?;
        check_token_values(Tensor::LseQ, self.lse_q, n)
    }
}

/// kl, lse_p and lse_q, each [N] f32.
type KlColumns = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The addresses the forward's launch reads: both logits tensors and the two row indices (0: none).
struct ForwardAddrs {
    p_logits: u64,
    q_logits: u64,
    p_rows: u64,
    q_rows: u64,
}

/// The forward of the KL op on the kernels: (kl, lse_p, lse_q), each [N] f32, or the first bad
/// row's error. The batch's shapes are checked here; the caller checks the temperature and, below
/// 1, the rows (the reference's `check_rows`).
pub(crate) fn kl_div_forward(batch: &KlBatch, tau: f64, device: Device) -> Result<KlColumns> {
    batch.validate()?;
    let shape = batch.shape();
    if shape.n_tokens() == 0 {
        return Ok(Default::default());
    }
    let l = Launcher::for_device(device)?;
    let p_logits = Input::logits(&l, &batch.p_logits)?;
    let q_logits = Input::logits(&l, &batch.q_logits)?;
    let p_rows = Input::optional(&l, batch.p_rows)?;
    let q_rows = Input::optional(&l, batch.q_index())?;
    let addrs = ForwardAddrs {
        p_logits: p_logits.addr,
        q_logits: q_logits.addr,
        p_rows: p_rows.addr,
        q_rows: q_rows.addr,
    };
    // SAFETY: p_logits and q_logits hold R * V and R' * V elements of the batch's dtype, p_rows and
    // the q index [N] in range (KlBatch::validate above) or NULL (then R = N, R' = N), all alive
    // until this function returns (launch_forward downloads the states before it returns).
    let states = unsafe { launch_forward(&l, &shape, tau, &addrs) }?;
    let v = batch.vocab;
    let row_of = |tensor: Tensor, t: usize| -> Result<Vec<f64>> {
        Ok(if tensor == Tensor::PLogits {
            batch.p_logits.row_f64(batch.p_row(t), v)
        } else {
            batch.q_logits.row_f64(batch.q_row(t), v)
        })
    };
    finish(&shape, tau, &states, &row_of).map_err(|(_, e)| e)
}

/// Queues the perception kernel in partial mode over a validated batch of N > 0 tokens and copies
/// back the N rows' states (N * 9 floats; on a GPU this waits for the kernel).
///
/// # Safety
/// The addresses are of `l`'s memory: `p_logits` and `q_logits` hold R * V and R' * V elements of
/// `shape`'s dtype, `p_rows` / `q_rows` (the q index) hold N rows in [0, R) / [0, R') or are 0 (then
/// R = N / R' = N), as [`KlShape::validate`] checked, and stay alive until this returns.
unsafe fn launch_forward(
    l: &Launcher,
    shape: &KlShape,
    tau: f64,
    addrs: &ForwardAddrs,
) -> Result<Vec<f32>> {
    let n = shape.n_tokens();
    let overflow = || VppoError::Shape {
        tensor: Tensor::PLogits,
        detail: format!("N = {n} partial states overflow"),
    };
    let floats = n
        .checked_mul(VPPO_PARTIAL_STATE_FLOATS as usize)
        .ok_or_else(overflow)?;
    let bytes = floats.checked_mul(4).ok_or_else(overflow)?;
    // No target: -1 is outside every shard, which partial mode allows (it reads column 0 instead
    // and flags the state as having no target, which is ignored here).
    let targets = l.upload(&vec![-1i32; n])?;
    let status = l.alloc(8)?;
    let partial = l.alloc(bytes)?;
    let p = VppoPerceptionParams {
        logits: addrs.p_logits as *const c_void,
        logits_masked: addrs.q_logits as *const c_void,
        targets: l.addr(&targets) as *const i32,
        status: l.addr(&status) as *mut std::os::raw::c_longlong,
        rows: addrs.p_rows as *const i64,
        masked_rows: addrs.q_rows as *const i64,
        n_tokens: n as i64,
        vocab: shape.vocab as i64,
        inv_temperature: (1.0 / tau) as f32,
        score_clamp: 1.0,
        partial: l.addr(&partial) as *mut f32,
        ..Default::default()
    };
    // SAFETY: the logits and indices as this function's contract says, targets N, partial N * 9
    // floats, status 1, all alive until the download below (which waits for the kernel). In partial
    // mode the kernel reads no old_logp (NULL), writes only `partial`, and reads a target column
    // only when it is in [0, V) (never here: every target is -1), else column 0 (V > 0).
    unsafe {
        l.launch(
            perception_kernel(shape.p.0),
            l.row_grid(n),
            PERCEPTION_THREADS,
            PERCEPTION_THREADS * PERCEPTION_STATE_BYTES,
            &p,
        )?
    };
    l.download(&partial, floats)
}

/// kl, lse_p and lse_q from the rows' states (raw logit units, f32), in f64 with the formulas of
/// the perception kernel's epilogue, checked row by row in the reference's order; or the first bad
/// token and its error. `row_of(tensor, t)` is token t's row of p_logits or q_logits widened to f64
/// (read only to name a bad value).
fn finish(
    shape: &KlShape,
    tau: f64,
    states: &[f32],
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> std::result::Result<KlColumns, (usize, VppoError)> {
    let n = shape.n_tokens();
    let (mut kl, mut lse_p, mut lse_q) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let first_bad = |tensor: Tensor, t: usize| -> std::result::Result<f64, (usize, VppoError)> {
        Ok(row_of(tensor, t)
            .map_err(|e| (t, e))?
            .into_iter()
            .find(|x| x.is_nan() || *x == f64::INFINITY)
            .unwrap_or(f64::NAN))
    };
    for (t, x) in states
        .chunks_exact(VPPO_PARTIAL_STATE_FLOATS as usize)
        .enumerate()
    {
        let w = |i: usize| x[i] as f64;
        let (m_a, s_a, e_a, f_b) = (w(0) / tau, w(1), w(2) / tau, w(3) / tau);
        let (m_b, s_b, flags) = (w(4) / tau, w(5), x[6] as u32);
        for (tensor, s) in [(Tensor::PLogits, s_a), (Tensor::QLogits, s_b)] {
            // s is NaN after a NaN or +inf, 0 for an all -inf row (and in [1, V] otherwise)
            if s.is_nan() {
                let value = first_bad(tensor, t)?;
                return Err((
                    t,
                    VppoError::NonFinite {
                        tensor,
                        location: Location::Row(t),
                        value,
                    },
                ));
            }
            if s <= 0.0 {
                return Err((t, VppoError::AllNegInf { tensor, row: t }));
            }
        }
        if flags & KL_INF != 0 {
            let a = row_of(Tensor::PLogits, t).map_err(|e| (t, e))?;
            let b = row_of(Tensor::QLogits, t).map_err(|e| (t, e))?;
            return Err((
                t,
                VppoError::KlInfinite {
                    tensor: Tensor::QLogits,
                    row: t,
                    column: kl_infinite_column(&a, &b).unwrap_or(0),
                },
            ));
        }
        if !e_a.is_finite() || !f_b.is_finite() {
            let tensor = if e_a.is_finite() {
                Tensor::QLogits
            } else {
                Tensor::PLogits
            };
            return Err((t, VppoError::RowOverflow { tensor, row: t }));
        }
        // kl = (e_a - f_b) / s_a + log(s_b / s_a), the log as log1p for sums that are close
        let k = ((e_a - f_b) / s_a + ((s_b - s_a) / s_a).ln_1p()).max(0.0);
        for (what, value, out) in [
            ("kl", k, &mut kl),
            ("lse_p", m_a + s_a.ln(), &mut lse_p),
            ("lse_q", m_b + s_b.ln(), &mut lse_q),
        ] {
            if value.is_nan() || value.abs() > f32::MAX as f64 {
                return Err((
                    t,
                    VppoError::Overflow {
                        what,
                        location: Some(Location::Row(t)),
                        value,
                    },
                ));
            }
            out.push(value as f32);
        }
    }
    Ok((kl, lse_p, lse_q))
}

/// The first element of `g` that is not finite, if any.
fn first_non_finite(g: &GradMut) -> Option<usize> {
    on_dtype!(g, x => x.iter().position(|e| !e.to_f64().is_finite()))
}

/// The addresses the backward's launch reads and writes (0: no index).
struct BackwardAddrs {
    p_logits: u64,
    q_logits: u64,
    p_rows: u64,
    q_rows: u64,
    kl: u64,
    lse_p: u64,
    lse_q: u64,
    grad_kl: u64,
    grad_p: u64,
    grad_q: u64,
}

/// Queues kernels/kl_div.cu over a validated batch of N > 0 tokens and V > 0.
///
/// # Safety
/// The addresses are of `l`'s memory: `p_logits` / `grad_p` hold R * V and `q_logits` / `grad_q`
/// R' * V elements of `shape`'s dtype, the saved values and grad_kl N f32 each, `p_rows` / `q_rows`
/// (the q index) N strictly increasing rows in [0, R) / [0, R') or 0 (then R = N / R' = N), as
/// [`KlShape::validate`] checked. The gradients are written by nothing else while the kernel runs,
/// and every buffer stays alive until the kernel has finished (the caller waits for it).
unsafe fn launch_backward(
    l: &Launcher,
    shape: &KlShape,
    tau: f64,
    a: &BackwardAddrs,
) -> Result<()> {
    let (n_p_rows, n_q_rows) = (shape.n_p_rows(), shape.n_q_rows());
    let p = VppoKlDivBackwardParams {
        p_logits: a.p_logits as *const c_void,
        q_logits: a.q_logits as *const c_void,
        lse_p: a.lse_p as *const f32,
        lse_q: a.lse_q as *const f32,
        kl: a.kl as *const f32,
        grad_kl: a.grad_kl as *const f32,
        grad_p: a.grad_p as *mut c_void,
        grad_q: a.grad_q as *mut c_void,
        p_rows: a.p_rows as *const i64,
        q_rows: a.q_rows as *const i64,
        n_p_rows: n_p_rows as i64,
        n_q_rows: n_q_rows as i64,
        n_tokens: shape.n_tokens() as i64,
        vocab: shape.vocab as i64,
        inv_temperature: (1.0 / tau) as f32,
        ..Default::default()
    };
    let items = n_p_rows
        .checked_add(n_q_rows)
        .ok_or_else(|| VppoError::Shape {
            tensor: Tensor::QLogits,
            detail: "R + R' overflows".into(),
        })?;
    // SAFETY: the shapes and liveness this function's contract states; each element of both
    // gradients is written by one thread (kernels/kl_div.cu: a gradient row belongs to the one token
    // that reads its logits row, the indices being strictly increasing, or to no token).
    unsafe {
        l.launch(
            kl_div_kernel(shape.p.0),
            l.row_grid(items),
            KL_DIV_THREADS,
            0,
            &p,
        )
    }
}

/// The backward of the KL op on the kernels: `grad_p` ([R, V], the shape and dtype of p_logits)
/// and `grad_q` ([R', V]) of sum_t grad_kl[t] kl_t, from the forward's `saved` values. Everything
/// the launch indexes with is checked here first. A gradient beyond its dtype is an overflow error,
/// and both buffers are then zero.
pub(crate) fn kl_div_backward(
    batch: &KlBatch,
    tau: f64,
    saved: &KlSaved,
    grad_kl: &[f32],
    mut grad_p: GradMut,
    mut grad_q: GradMut,
    device: Device,
) -> Result<()> {
    batch.validate()?;
    let (n, v) = (batch.n_tokens(), batch.vocab);
    saved.check(n)?;
    check_token_values(Tensor::GradKl, grad_kl, n)?;
    check_grad(Tensor::GradP, &grad_p, batch, batch.p_logits.len())?;
    check_grad(Tensor::GradQ, &grad_q, batch, batch.q_logits.len())?;
    if n == 0 || v == 0 {
        // No token reads a row: every row of both gradients is zero.
        on_dtype!(&mut grad_p, g => g.fill(Default::default()));
        on_dtype!(&mut grad_q, g => g.fill(Default::default()));
        return Ok(());
    }
    let l = &Launcher::for_device(device)?;
    let p_logits = Input::logits(l, &batch.p_logits)?;
    let q_logits = Input::logits(l, &batch.q_logits)?;
    let p_rows = Input::optional(l, batch.p_rows)?;
    let q_rows = Input::optional(l, batch.q_index())?;
    let kl = Input::new(l, saved.kl)?;
    let lse_p = Input::new(l, saved.lse_p)?;
    let lse_q = Input::new(l, saved.lse_q)?;
    let upstream = Input::new(l, grad_kl)?;
    let dtype = batch.p_logits.dtype();
    // On a GPU the kernel writes device buffers (every element: kernels/kl_div.cu), then copied back.
    let device_grads = match l {
        Launcher::Simt(_) => None,
        Launcher::Cuda(_) => Some((
            l.alloc_for_overwrite(grad_p.len() * dtype.size())?,
            l.alloc_for_overwrite(grad_q.len() * dtype.size())?,
        )),
    };
    let (gp_addr, gq_addr) = match &device_grads {
        Some((gp, gq)) => (l.addr(gp), l.addr(gq)),
        None => (
            on_dtype!(&mut grad_p, g => g.as_mut_ptr() as u64),
            on_dtype!(&mut grad_q, g => g.as_mut_ptr() as u64),
        ),
    };
    let addrs = BackwardAddrs {
        p_logits: p_logits.addr,
        q_logits: q_logits.addr,
        p_rows: p_rows.addr,
        q_rows: q_rows.addr,
        kl: kl.addr,
        lse_p: lse_p.addr,
        lse_q: lse_q.addr,
        grad_kl: upstream.addr,
        grad_p: gp_addr,
        grad_q: gq_addr,
    };
    // SAFETY: p_logits / grad_p hold R * V elements and q_logits / grad_q R' * V elements of the
    // batch's dtype (check_grad and KlBatch::validate above), the saved values and grad_kl N each
    // (checked), the indices as validate checked them. The gradients are fresh device buffers or
    // the caller's slices, borrowed mutably for this whole function; every buffer lives until the
    // function returns, after the copies back (on the SIMT executor the launch is synchronous).
    unsafe { launch_backward(l, &batch.shape(), tau, &addrs) }?;
    if let Some((gp, gq)) = device_grads {
        on_dtype!(&mut grad_p, g => l.download_into(&gp, g)?);
        on_dtype!(&mut grad_q, g => l.download_into(&gq, g)?);
    }
    let bad = [(Tensor::GradP, &grad_p), (Tensor::GradQ, &grad_q)]
        .into_iter()
        .find_map(|(tensor, g)| {
            first_non_finite(g).map(|i| (tensor, i, on_dtype!(g, x => x[i].to_f64())))
        });
    if let Some((tensor, i, value)) = bad {
        on_dtype!(&mut grad_p, g => g.fill(Default::default()));
        on_dtype!(&mut grad_q, g => g.fill(Default::default()));
        return Err(VppoError::Overflow {
            what: tensor.name(),
            location: Some(Location::Row(i / v)),
            value,
        });
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// The caller's GPU buffers, used in place (the Python op's CUDA path)
// -------------------------------------------------------------------------------------------------

/// The KL op's inputs on the GPU, borrowed from the caller: [`KlBatch`] with device buffers (the
/// same shapes and rules). Every buffer must belong to the context of the op's GPU (a buffer of
/// another is an error naming it, before any launch); the work is ordered after what is queued on
/// each buffer's stream.
#[derive(Debug, Clone, Copy)]
pub struct DeviceKlBatch<'a> {
    /// [N, V] or [R, V]: the logits of p.
    pub p_logits: DeviceLogits<'a>,
    /// [N, V] or [R', V], the dtype of `p_logits`: the logits of q.
    pub q_logits: DeviceLogits<'a>,
    /// V.
    pub vocab: usize,
    /// [N] or None.
    pub p_rows: Option<&'a CudaSlice<i64>>,
    /// [N] or None.
    pub q_rows: Option<&'a CudaSlice<i64>>,
}

/// What the KL op's backward reads of its forward, on the GPU, each [N] f32 (the device form of
/// [`KlSaved`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceKlSaved<'a> {
    /// KL(p || q) per token.
    pub kl: &'a CudaSlice<f32>,
    /// logsumexp(p_logits[row] / tau).
    pub lse_p: &'a CudaSlice<f32>,
    /// logsumexp(q_logits[row] / tau).
    pub lse_q: &'a CudaSlice<f32>,
}

impl<'a> DeviceKlBatch<'a> {
    /// The shapes, with host copies of the indices.
    fn shape<'s>(&self, p_rows: Option<&'s [i64]>, q_rows: Option<&'s [i64]>) -> KlShape<'s> {
        KlShape {
            p: (self.p_logits.dtype(), self.p_logits.len()),
            q: (self.q_logits.dtype(), self.q_logits.len()),
            vocab: self.vocab,
            p_rows,
            q_rows,
        }
    }

    fn residences(&self) -> Vec<Residence<'a>> {
        let mut all = vec![
            self.p_logits.residence(Tensor::PLogits),
            self.q_logits.residence(Tensor::QLogits),
        ];
        all.extend(self.p_rows.map(|r| residence(Tensor::PRows, r)));
        all.extend(self.q_rows.map(|r| residence(Tensor::QRows, r)));
        all
    }
}

/// Host copies of small device buffers (the indices, the saved values), gathered on the device and
/// copied back in one transfer (one wait for the GPU).
fn download_small<T: bytemuck::Pod + cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    buffers: &[Option<&CudaSlice<T>>],
) -> Result<Vec<Option<Vec<T>>>> {
    let mut layout = ArenaLayout::new(16);
    let regions: Vec<_> = buffers
        .iter()
        .map(|b| b.map(|b| (b, layout.array::<T>(b.len()))))
        .collect();
    let mut raw = vec![0u8; layout.end];
    if layout.end > 0 {
        let mut staging = gpu.alloc_uninit::<u8>(layout.end)?;
        for (b, region) in regions.iter().flatten() {
            gpu.copy_bytes_on_device(*b, &mut staging, region.offset)?;
        }
        gpu.download_range_into(&staging, 0, &mut raw)?;
    }
    let copy = ArenaCopy(raw);
    Ok(regions
        .into_iter()
        .map(|r| r.map(|(_, region)| copy.get(region)))
        .collect())
}

/// A device copy of checked host indices, for the kernels to index with (never the caller's
/// buffer, which could change after the check).
fn upload_index(gpu: &Gpu, index: Option<&[i64]>) -> Result<Option<CudaSlice<i64>>> {
    index
        .filter(|r| !r.is_empty())
        .map(|r| gpu.upload(r))
        .transpose()
}

/// The forward of the KL op on the caller's GPU buffers: (kl, lse_p, lse_q) on the host, each [N]
/// f32, or the first bad row's error, as [`kl_div_forward`] gives for the same batch. The indices
/// are copied back and checked before any launch, and the kernel indexes with a copy of the checked
/// ones; the logits are only read by the kernel (a row is copied back only to name a bad value).
/// Below temperature 1 the error of a row the kernel flags is the reference's for that row; the host
/// path's full pre-check of every row (an [N, V] read on the host) is not made, so a finite logit
/// whose quotient by tau is below -f32::MAX counts as -inf here instead of being refused.
pub(crate) fn kl_div_forward_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceKlBatch,
    tau: f64,
) -> Result<KlColumns> {
    join_caller_streams(gpu, &batch.residences())?;
    let mut idx = download_small(gpu, &[batch.p_rows, batch.q_rows])?.into_iter();
    let (p_rows, q_rows) = (idx.next().flatten(), idx.next().flatten());
    let shape = batch.shape(p_rows.as_deref(), q_rows.as_deref());
    shape.validate()?;
    let n = shape.n_tokens();
    if n == 0 {
        return Ok(Default::default());
    }
    let l = Launcher::Cuda(gpu.clone());
    let (dp, dq) = (
        upload_index(gpu, shape.p_rows)?,
        upload_index(gpu, shape.q_index())?,
    );
    let addr = |r: &Option<CudaSlice<i64>>| r.as_ref().map_or(0, |r| gpu.device_ptr_u64(r));
    let addrs = ForwardAddrs {
        p_logits: batch.p_logits.addr(gpu),
        q_logits: batch.q_logits.addr(gpu),
        p_rows: addr(&dp),
        q_rows: addr(&dq),
    };
    // SAFETY: the caller's logits buffers hold R * V and R' * V elements of the batch's dtype (their
    // lengths, validated above), in this GPU's context (join_caller_streams checked it); the indices
    // are our uploads of the validated host copies (N rows in range), or absent (R = N / R' = N). The
    // buffers are borrowed for this call and launch_forward waits for the kernel.
    let states = unsafe { launch_forward(&l, &shape, tau, &addrs) }?;
    let v = batch.vocab;
    let row_of = |tensor: Tensor, t: usize| -> Result<Vec<f64>> {
        if tensor == Tensor::PLogits {
            batch.p_logits.row_f64(gpu, shape.p_row(t), v)
        } else {
            batch.q_logits.row_f64(gpu, shape.q_row(t), v)
        }
    };
    finish(&shape, tau, &states, &row_of).map_err(|(t, e)| {
        if tau >= 1.0 {
            return e;
        }
        // The host path checks every row first below temperature 1 (the reference's order within
        // a row): for the flagged row, that check's error.
        let rows = row_of(Tensor::PLogits, t).and_then(|a| Ok((a, row_of(Tensor::QLogits, t)?)));
        match rows {
            Ok((a, b)) => check_token_rows(a, b, t, tau).err().unwrap_or(e),
            Err(copy) => copy,
        }
    })
}

/// The largest finite value of `dtype`.
fn dtype_max(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => f32::MAX as f64,
        Dtype::F16 => half::f16::MAX.to_f64(),
        Dtype::Bf16 => half::bf16::MAX.to_f64(),
    }
}

/// The backward of the KL op into the caller's GPU buffers `grad_p` and `grad_q` (the shapes and
/// dtype of the logits), as [`kl_div_backward`] writes them for the same inputs. The indices, the
/// saved values and grad_kl (O(N)) are copied back once and checked before any launch. The written
/// gradients are not read back: instead each token's bound |grad| <= |u_t| (2 kl_t + 1) / tau (for
/// the logits and saved values of one forward; ((log p - log q) - kl) p is within kl + 1 of 0 in
/// magnitude, and |q - p| <= 1) must fit the dtype, else the call is an overflow error naming
/// `grad_p` and the token's row, with both buffers zeroed (as the host path leaves them).
pub(crate) fn kl_div_backward_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceKlBatch,
    tau: f64,
    saved: &DeviceKlSaved,
    grad_kl: &CudaSlice<f32>,
    mut grad_p: DeviceLogitsMut,
    mut grad_q: DeviceLogitsMut,
) -> Result<()> {
    {
        let mut buffers = batch.residences();
        buffers.extend([
            residence(Tensor::Kl, saved.kl),
            residence(Tensor::LseP, saved.lse_p),
            residence(Tensor::LseQ, saved.lse_q),
            residence(Tensor::GradKl, grad_kl),
            grad_p.residence(Tensor::GradP),
            grad_q.residence(Tensor::GradQ),
        ]);
        join_caller_streams(gpu, &buffers)?;
    }
    let mut idx = download_small(gpu, &[batch.p_rows, batch.q_rows])?.into_iter();
    let (p_rows, q_rows) = (idx.next().flatten(), idx.next().flatten());
    let small = download_small(
        gpu,
        &[
            Some(saved.kl),
            Some(saved.lse_p),
            Some(saved.lse_q),
            Some(grad_kl),
        ],
    )?;
    let [kl, lse_p, lse_q, u]: [Vec<f32>; 4] = small
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| VppoError::Kernel("four saved tensors were copied back".into()))?;
    let shape = batch.shape(p_rows.as_deref(), q_rows.as_deref());
    shape.validate()?;
    let (n, v) = (shape.n_tokens(), shape.vocab);
    KlSaved {
        kl: &kl,
        lse_p: &lse_p,
        lse_q: &lse_q,
    }
    .check(n)?;
    check_token_values(Tensor::GradKl, &u, n)?;
    let dtype = shape.p.0;
    check_grad_buffer(
        Tensor::GradP,
        (grad_p.dtype(), grad_p.len()),
        dtype,
        shape.p.1,
    )?;
    check_grad_buffer(
        Tensor::GradQ,
        (grad_q.dtype(), grad_q.len()),
        dtype,
        shape.q.1,
    )?;
    let zero_both = |grad_p: &mut DeviceLogitsMut, grad_q: &mut DeviceLogitsMut| -> Result<()> {
        super::resident::zero_gradient(gpu, grad_p)?;
        super::resident::zero_gradient(gpu, grad_q)?;
        gpu.synchronize()
    };
    if n == 0 || v == 0 {
        // No token reads a row: every row of both gradients is zero.
        return zero_both(&mut grad_p, &mut grad_q);
    }
    let max = dtype_max(dtype);
    let over = (0..n).find_map(|t| {
        let bound = (u[t] as f64).abs() * (2.0 * kl[t] as f64 + 1.0) / tau;
        // 1 % of headroom for the f32 arithmetic and the rounding to the dtype
        (bound * 1.01 > max).then_some((t, bound))
    });
    if let Some((t, bound)) = over {
        zero_both(&mut grad_p, &mut grad_q)?;
        return Err(VppoError::Overflow {
            what: Tensor::GradP.name(),
            location: Some(Location::Row(shape.p_row(t))),
            value: bound,
        });
    }
    let l = Launcher::Cuda(gpu.clone());
    let (dp, dq) = (
        upload_index(gpu, shape.p_rows)?,
        upload_index(gpu, shape.q_index())?,
    );
    let addr = |r: &Option<CudaSlice<i64>>| r.as_ref().map_or(0, |r| gpu.device_ptr_u64(r));
    let addrs = BackwardAddrs {
        p_logits: batch.p_logits.addr(gpu),
        q_logits: batch.q_logits.addr(gpu),
        p_rows: addr(&dp),
        q_rows: addr(&dq),
        kl: gpu.device_ptr_u64(saved.kl),
        lse_p: gpu.device_ptr_u64(saved.lse_p),
        lse_q: gpu.device_ptr_u64(saved.lse_q),
        grad_kl: gpu.device_ptr_u64(grad_kl),
        grad_p: grad_p.addr(gpu),
        grad_q: grad_q.addr(gpu),
    };
    // SAFETY: the logits and gradients hold R * V / R' * V elements of the batch's dtype (their
    // lengths, checked above), the saved values and grad_kl N f32 each (the copies just checked have
    // their lengths), all in this GPU's context (join_caller_streams); the indices are our uploads of
    // the validated copies. grad_p and grad_q are borrowed mutably for this call (no other view of
    // them), and the call synchronizes before any buffer can be dropped.
    unsafe { launch_backward(&l, &shape, tau, &addrs) }?;
    gpu.synchronize()
}
