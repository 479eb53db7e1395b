//! Tensor views: one dtype-tagged type, [`ByDtype`], for every buffer of logits-typed elements the
//! crate reads or writes (borrowed host slices, the caller's gradient buffer, GPU-resident buffers),
//! so `dtype()` and `len()` are written once, not once per kind of buffer.
//!
//! What holds the elements is a type parameter (a [`Buffer`]: `&[T]`, `&mut [T]`, `Vec<T>`, a
//! `CudaSlice<T>` or a reference to one); the names the crate uses are aliases: [`Logits`],
//! [`GradMut`], [`OwnedLogits`], [`DeviceTensor`], [`DeviceLogits`], [`DeviceLogitsMut`].

use std::fmt;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

/// The element type of a logits tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// Lower-case name as used in kernel names and messages ("f32", "f16", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// One of the three element types: f32, f16, bf16.
pub trait Elem: bytemuck::Pod + cudarc::driver::DeviceRepr + fmt::Debug + 'static {
    /// Its tag.
    const DTYPE: Dtype;
    /// The value widened exactly to f64.
    fn to_f64(self) -> f64;
}

impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Elem for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

impl Elem for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// A holder of elements: a slice, a vector, a GPU buffer, or a reference to one.
pub trait Buffer {
    /// How many elements it holds.
    fn len(&self) -> usize;

    /// True when it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Buffer for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

impl<T> Buffer for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

impl<T> Buffer for CudaSlice<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

impl<X: Buffer + ?Sized> Buffer for &X {
    fn len(&self) -> usize {
        (**self).len()
    }
}

impl<X: Buffer + ?Sized> Buffer for &mut X {
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// A buffer of one of the three element types, tagged by its dtype: `F`, `H` and `B` hold f32, f16
/// and bf16 elements (the same kind of holder for each; see the aliases below).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ByDtype<F, H, B> {
    /// f32 elements.
    F32(F),
    /// f16 elements.
    F16(H),
    /// bf16 elements.
    Bf16(B),
}

/// `$body` with `$x` bound to the buffer inside a [`ByDtype`], whatever its dtype.
macro_rules! on_dtype {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            $crate::tensor::ByDtype::F32($x) => $body,
            $crate::tensor::ByDtype::F16($x) => $body,
            $crate::tensor::ByDtype::Bf16($x) => $body,
        }
    };
}
pub(crate) use on_dtype;

/// The [`ByDtype`] of the same dtype holding `$body`, with `$x` bound to the buffer inside `$e`: a
/// view of a buffer as another kind of holder (`Vec<T>` as `&[T]`, `&mut X` as `&X`, ...).
macro_rules! map_dtype {
    ($e:expr, $x:ident => $body:expr) => {
        match $e {
            $crate::tensor::ByDtype::F32($x) => $crate::tensor::ByDtype::F32($body),
            $crate::tensor::ByDtype::F16($x) => $crate::tensor::ByDtype::F16($body),
            $crate::tensor::ByDtype::Bf16($x) => $crate::tensor::ByDtype::Bf16($body),
        }
    };
}

impl<F, H, B> ByDtype<F, H, B> {
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            ByDtype::F32(_) => Dtype::F32,
            ByDtype::F16(_) => Dtype::F16,
            ByDtype::Bf16(_) => Dtype::Bf16,
        }
    }
}

impl<F: Buffer, H: Buffer, B: Buffer> ByDtype<F, H, B> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        on_dtype!(self, x => x.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A borrowed [N, V] logits tensor in one of the three supported dtypes, row-major.
pub type Logits<'a> = ByDtype<&'a [f32], &'a [f16], &'a [bf16]>;

/// A caller's buffer for dloss/dlogits [N, V], in f32 or in the logits dtype.
pub type GradMut<'a> = ByDtype<&'a mut [f32], &'a mut [f16], &'a mut [bf16]>;

/// An owned [N, V] logits tensor (a file's contents, a synthetic batch, a gradient to write out).
pub type OwnedLogits = ByDtype<Vec<f32>, Vec<f16>, Vec<bf16>>;

/// A GPU-resident [N, V] tensor owned by its holder (the benchmark's uploaded logits and gradients).
pub type DeviceTensor = ByDtype<CudaSlice<f32>, CudaSlice<f16>, CudaSlice<bf16>>;

/// A GPU-resident [N, V] logits tensor borrowed from the caller.
pub type DeviceLogits<'a> = ByDtype<&'a CudaSlice<f32>, &'a CudaSlice<f16>, &'a CudaSlice<bf16>>;

/// A GPU-resident [N, V] buffer the kernels write: a gradient buffer, or the logits themselves for
/// the in-place backward.
pub type DeviceLogitsMut<'a> =
    ByDtype<&'a mut CudaSlice<f32>, &'a mut CudaSlice<f16>, &'a mut CudaSlice<bf16>>;

impl<'a> Logits<'a> {
    /// Element `i`, widened exactly to f64.
    #[inline]
    pub fn get(&self, i: usize) -> f64 {
        on_dtype!(self, x => x[i].to_f64())
    }

    /// Row `t` of a [N, V] tensor, widened exactly to f64.
    pub fn row_f64(&self, t: usize, vocab: usize) -> Vec<f64> {
        (t * vocab..(t + 1) * vocab).map(|i| self.get(i)).collect()
    }

    /// The raw bytes (little-endian, as the GPU and safetensors store them).
    pub fn as_bytes(&self) -> &'a [u8] {
        on_dtype!(*self, x => bytemuck::cast_slice(x))
    }
}

impl GradMut<'_> {
    /// A copy of the buffer widened exactly to f32 (what the reference reads before an in-place
    /// backward overwrites the logits held here).
    pub fn to_f32(&self) -> Vec<f32> {
        on_dtype!(self, x => x.iter().map(|&v| v.to_f64() as f32).collect())
    }
}

impl<'a> DeviceLogitsMut<'a> {
    /// The same buffer, borrowed for reading.
    pub fn as_ref(&self) -> DeviceLogits<'_> {
        map_dtype!(self, s => &**s)
    }
}

impl OwnedLogits {
    /// A borrowed view.
    pub fn view(&self) -> Logits<'_> {
        map_dtype!(self, x => x.as_slice())
    }

    /// The buffer lent as a gradient to write into.
    pub fn as_grad_mut(&mut self) -> GradMut<'_> {
        map_dtype!(self, x => x.as_mut_slice())
    }
}

impl DeviceTensor {
    /// A borrowed view, as the kernels read it.
    pub fn view(&self) -> DeviceLogits<'_> {
        map_dtype!(self, x => x)
    }

    /// The buffer lent to the kernels to write.
    pub fn as_mut(&mut self) -> DeviceLogitsMut<'_> {
        map_dtype!(self, x => x)
    }
}
