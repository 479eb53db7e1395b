//! Finds nvcc and compiles kernels/*.cu into embedded fatbins. (Filled in by the nvcc work.)
pub fn build() {}
