//! The per-token and per-response buffers of one forward, carved out of one allocation.

#[allow(unused_imports)]
use super::*;

/// Where one output lives inside a [`Workspace`]'s arena: a byte offset and a length in bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub(super) offset: usize,
    pub(super) bytes: usize,
}

/// Lays regions out one after another in one buffer, each starting on an `align`-byte boundary.
pub(super) struct ArenaLayout {
    pub(super) end: usize,
    pub(super) align: usize,
}

impl ArenaLayout {
    pub(super) fn new(align: usize) -> ArenaLayout {
        ArenaLayout { end: 0, align }
    }

    /// The next region, of `bytes` bytes.
    pub(super) fn region(&mut self, bytes: usize) -> Region {
        let r = Region {
            offset: self.end,
            bytes,
        };
        self.end = (self.end + bytes).next_multiple_of(self.align);
        r
    }

    /// The next region, for `count` values of T.
    pub(super) fn array<T>(&mut self, count: usize) -> Region {
        self.region(count * std::mem::size_of::<T>())
    }
}

/// Per-token and per-response buffers of one forward pass, carved out of one allocation (the arena),
/// so that a forward allocates once, zeroes once and copies every output back in one transfer.
/// Regions start on 256-byte boundaries (the allocation's own alignment), so every per-token array
/// is aligned for vector loads and the totals' doubles for 8-byte access.
pub(super) struct Workspace {
    pub(super) n: usize,
    pub(super) b: usize,
    pub(super) arena: Buffer,
    /// Bytes of the arena that [`Workspace::download`] copies back: the outputs, not the scratch
    /// regions after them.
    pub(super) bytes: usize,
    pub(super) totals: Region,
    pub(super) status: Region,
    pub(super) lse: Region,
    pub(super) lse_masked: Region,
    pub(super) logp: Region,
    pub(super) logp_masked: Region,
    pub(super) kl: Region,
    pub(super) k3: Region,
    pub(super) entropy: Region,
    pub(super) score: Region,
    pub(super) dlogp: Region,
    pub(super) mask: Region,
    pub(super) k: Region,
    pub(super) sbar: Region,
    pub(super) alpha: Region,
    // Scratch of pass 2 (kernels/select_loss.cu), after the outputs: never copied back.
    /// s_b, scratch of the GSPO loss types.
    pub(super) seq_log_ratio: Region,
    /// The masked count of each response, scratch of the GSPO loss types.
    pub(super) seq_selected: Region,
    /// The response of each token [N] (i32), written by `vppo_select` for `vppo_loss`.
    pub(super) token_response: Region,
    /// The per-response constants of the per-token loss [B] (`VppoLossResponse`).
    pub(super) loss_responses: Region,
    /// The sums of each tile of `vppo_loss` [ceil(N / VPPO_LOSS_TILE_TOKENS)] (`VppoLossTotals`).
    pub(super) loss_partials: Region,
}

impl Workspace {
    const ALIGN: usize = 256;

    pub(super) fn new(l: &Launcher, n: usize, b: usize) -> Result<Workspace> {
        let mut layout = ArenaLayout::new(Self::ALIGN);
        let totals = layout.array::<VppoLossTotals>(1);
        let status = layout.array::<i64>(1);
        let [lse, lse_masked, logp, logp_masked, kl, k3, entropy, score, dlogp] =
            [(); 9].map(|_| layout.array::<f32>(n));
        let mask = layout.array::<u8>(n);
        let k = layout.array::<i32>(b);
        let [sbar, alpha] = [(); 2].map(|_| layout.array::<f32>(b));
        let outputs_end = layout.end;
        let seq_log_ratio = layout.array::<f64>(b);
        let seq_selected = layout.array::<i32>(b);
        let token_response = layout.array::<i32>(n);
        let loss_responses = layout.array::<VppoLossResponse>(b);
        let loss_partials = layout.array::<VppoLossTotals>(loss_tiles(n));
        let end = layout.end;
        // Zeroed (not just allocated): after a bad row pass 2 still runs over every region before
        // the status is read (see `forward`), and zeros keep those reads defined and finite.
        let mut arena = l.alloc(end)?;
        l.write_at(&mut arena, status.offset, &[VPPO_STATUS_CLEAR as i64])?;
        Ok(Workspace {
            n,
            b,
            arena,
            bytes: outputs_end,
            totals,
            status,
            lse,
            lse_masked,
            logp,
            logp_masked,
            kl,
            k3,
            entropy,
            score,
            dlogp,
            mask,
            k,
            sbar,
            alpha,
            seq_log_ratio,
            seq_selected,
            token_response,
            loss_responses,
            loss_partials,
        })
    }

    /// The address of `r` in the launcher's memory space.
    pub(super) fn addr(&self, l: &Launcher, r: Region) -> u64 {
        l.addr(&self.arena) + r.offset as u64
    }

    /// [`Workspace::addr`] as the typed pointer a params struct holds.
    pub(super) fn ptr<T>(&self, l: &Launcher, r: Region) -> *mut T {
        self.addr(l, r) as usize as *mut T
    }

    /// The whole arena, copied back in one transfer (on a GPU this waits for the work before it).
    pub(super) fn download(&self, l: &Launcher) -> Result<ArenaCopy> {
        Ok(ArenaCopy(l.download_bytes(&self.arena, 0, self.bytes)?))
    }
}

/// A host copy of a buffer laid out by an [`ArenaLayout`] (a [`Workspace`], or the gathered small
/// tensors of a device batch), read region by region.
pub(super) struct ArenaCopy(pub(super) Vec<u8>);

impl ArenaCopy {
    /// The status word of the perception pass.
    pub(super) fn status(&self, ws: &Workspace) -> i64 {
        self.get::<i64>(ws.status)[0]
    }

    /// Region `r` as T values (copied out: the arena bytes need not be aligned for T on the host).
    pub(super) fn get<T: bytemuck::Pod>(&self, r: Region) -> Vec<T> {
        bytemuck::pod_collect_to_vec(&self.0[r.offset..r.offset + r.bytes])
    }
}
