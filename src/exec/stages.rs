//! Pass-level launches on the SIMT executor, for the benchmarks (benches/vppo.rs): the CPU twin of
//! [`DeviceStages`] (resident.rs), which times the loss kernels against pass 1 without a GPU.

#[allow(unused_imports)]
use super::*;

/// A validated host batch whose passes run one at a time on the SIMT executor, for the benchmarks:
/// pass 1 alone, pass 2a (`vppo_select`) alone, pass 2b (the three loss kernels) alone.
///
/// [`HostStages::new`] validates the batch and runs the whole forward once (which checks the logits
/// rows), leaving the per-token workspace in place; each method then runs its pass's kernels again
/// over that workspace (rewriting it with the same values), with no allocation and no copy. Not part
/// of the supported API.
#[doc(hidden)]
pub struct HostStages<'a> {
    l: Launcher,
    dims: Dims,
    cfg: VppoConfig,
    inputs: Inputs<'a>,
    ws: Workspace,
}

impl<'a> HostStages<'a> {
    /// Validates `batch` for `cfg` (N > 0) and runs the forward once on `Device::Simt(order)`.
    pub fn new(batch: &Batch<'a>, cfg: &VppoConfig, order: LaneOrder) -> Result<Self> {
        batch.validate(cfg)?;
        if batch.n_tokens() == 0 {
            return Err(VppoError::Kernel(
                "HostStages needs a batch with tokens (N = 0 runs no kernels)".into(),
            ));
        }
        let l = Launcher::Simt(order);
        let dims = Dims::of(batch);
        let inputs = Inputs::new(&l, batch, cfg.needs_ref_logp())?;
        let ws = Workspace::new(&l, dims.n, dims.b)?;
        run_passes(
            &l,
            dims,
            cfg,
            &inputs,
            &ws,
            batch.targets,
            &host_rows(batch),
        )?;
        Ok(HostStages {
            l,
            dims,
            cfg: cfg.clone(),
            inputs,
            ws,
        })
    }

    /// Pass 1 (`vppo_perception_*`).
    pub fn perception(&self) -> Result<()> {
        let kernel = perception_kernel(self.dims.dtype);
        run_perception(
            &self.l,
            kernel,
            self.dims,
            &self.cfg,
            &self.inputs,
            &self.ws,
        )
    }

    /// Pass 2a (`vppo_select`).
    pub fn select(&self) -> Result<()> {
        run_select(&self.l, self.dims, &self.cfg, &self.inputs, &self.ws)
    }

    /// Pass 2b (`vppo_loss_prep`, `vppo_loss`, `vppo_loss_finish`).
    pub fn loss(&self) -> Result<()> {
        run_loss(&self.l, self.dims, &self.cfg, &self.inputs, &self.ws)
    }

    /// The loss of the last pass 2b, from the workspace's totals.
    pub fn loss_value(&self) -> Result<f64> {
        let copy = self.ws.download(&self.l)?;
        let t: VppoLossTotals = copy.get(self.ws.totals)[0];
        Ok(t.loss)
    }
}
