//! Where the loss runs: the devices, and the lane order of the SIMT executor.

/// Order in which the SIMT executor runs the lanes of a block (see kernels/simt/).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneOrder {
    /// Thread 0 first.
    Forward,
    /// The last thread first: code that is right only by luck of scheduling fails in one order.
    Reverse,
    /// One warp at a time runs as far as it can (to a barrier, or a wait on another warp) before any
    /// other warp runs; the leading warp changes at every barrier. Catches a warp that overwrites
    /// shared memory other warps have not read yet, which both lane orders can hide.
    RunAhead,
}

/// Where the loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU reference (the oracle: plain loops, f64).
    Reference,
    /// The CUDA kernels, run on the CPU by the SIMT executor.
    Simt(LaneOrder),
    /// The CUDA kernels on GPU `ordinal`.
    Cuda(usize),
}
