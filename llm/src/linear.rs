//! The matmul seam: every weight matrix of the model is a [`QLinear`].
//!
//! `forward` multiplies a row-major `n × in` f32 activation by the transposed weight into
//! `n × out`. Two engines, both bit-identical per row whatever other rows share the call:
//! - `Q4_0`, `Q4_1` and `Q8_0` (the default model's formats) go to [`trail_kernels::QMatrix`]:
//!   weights repacked at load into 16-output tiles, activations quantized once per step and
//!   shared by the matrices that read the same input ([`QLinear::forward_group`]), each weight
//!   block loaded once for up to 8 rows, tiles spread over rayon's threads.
//! - Every other GGUF format stays in its block vectors and runs candle's CPU kernel
//!   `k_quants::matmul`, which quantizes each activation row on its own and computes every
//!   output with the same dot routine whatever `n` is. candle's `QMatMul::forward` is not used:
//!   it routes some formats (x86 Q4K/Q6K/Q8_0, aarch64 repacks) to kernels chosen by `n`,
//!   which would break batch invariance.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K,
    BlockQ6K, BlockQ8_0, GgmlType,
};
use half::{bf16, f16};
use trail_kernels::{BlockFormat, QActivations, QMatrix, SimdPath};

use crate::error::Result;
use crate::gguf::{GgufFile, storage_bytes};

/// Typed weight blocks, one variant per GGUF format the CPU kernels handle.
enum Blocks {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

macro_rules! dispatch {
    ($blocks:expr, $v:ident => $e:expr) => {
        match $blocks {
            Blocks::F32($v) => $e,
            Blocks::F16($v) => $e,
            Blocks::Bf16($v) => $e,
            Blocks::Q4_0($v) => $e,
            Blocks::Q4_1($v) => $e,
            Blocks::Q5_0($v) => $e,
            Blocks::Q5_1($v) => $e,
            Blocks::Q8_0($v) => $e,
            Blocks::Q2K($v) => $e,
            Blocks::Q3K($v) => $e,
            Blocks::Q4K($v) => $e,
            Blocks::Q5K($v) => $e,
            Blocks::Q6K($v) => $e,
        }
    };
}

/// Where a matrix's weights live: repacked for trail's kernels, or candle's block vectors.
enum Weights {
    Fast(QMatrix),
    Candle(Blocks),
}

/// A weight matrix `out × in` in its GGUF block format; `y = x · Wᵀ`.
pub struct QLinear {
    out_features: usize,
    in_features: usize,
    dtype: GgmlDType,
    weights: Weights,
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QLinear({:?}, {}×{})",
            self.dtype(),
            self.out_features,
            self.in_features
        )
    }
}

fn read_blocks<T: GgmlType>(gguf: &mut GgufFile, name: &str, elems: usize) -> Result<Vec<T>> {
    let n_blocks = elems / T::BLCK_SIZE;
    let bytes =
        storage_bytes(T::DTYPE, elems).ok_or_else(|| gguf.bad_tensor(name, "not whole blocks"))?;
    assert_eq!(
        size_of::<T>() * n_blocks,
        bytes,
        "{:?} block layout",
        T::DTYPE
    );
    let mut blocks = vec![T::zeros(); n_blocks];
    // SAFETY: the block types are `repr(C)` plain data (integers, f16 and arrays of them) for
    // which every bit pattern is valid, and the byte view covers exactly the vector's storage.
    let view = unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, bytes) };
    gguf.read_tensor_bytes(name, view)?;
    Ok(blocks)
}

impl QLinear {
    /// Reads matrix `name` (candle shape `[out, in]`) from `gguf`.
    pub fn load(gguf: &mut GgufFile, name: &str) -> Result<Self> {
        let info = gguf.tensor_info(name)?;
        let dtype = info.ggml_dtype;
        let (out_features, in_features) = match info.shape.dims() {
            &[out, inp] => (out, inp),
            &[n] => (1, n),
            dims => return Err(gguf.bad_tensor(name, format!("expected a matrix, got {dims:?}"))),
        };
        if !in_features.is_multiple_of(dtype.block_size()) {
            return Err(gguf.bad_tensor(
                name,
                format!(
                    "rows of {in_features} are not whole {dtype:?} blocks of {}",
                    dtype.block_size()
                ),
            ));
        }
        let elems = out_features * in_features;
        if let Some(format) = block_format(dtype)
            && in_features.is_multiple_of(32)
        {
            let bytes = storage_bytes(dtype, elems)
                .ok_or_else(|| gguf.bad_tensor(name, "not whole blocks"))?;
            let mut raw = vec![0u8; bytes];
            gguf.read_tensor_bytes(name, &mut raw)?;
            let m = QMatrix::from_gguf_bytes(format, out_features, in_features, &raw)
                .map_err(|e| gguf.bad_tensor(name, e.to_string()))?;
            return Ok(Self {
                out_features,
                in_features,
                dtype,
                weights: Weights::Fast(m),
            });
        }
        let blocks = match dtype {
            GgmlDType::F32 => Blocks::F32(read_blocks(gguf, name, elems)?),
            GgmlDType::F16 => Blocks::F16(read_blocks(gguf, name, elems)?),
            GgmlDType::BF16 => Blocks::Bf16(read_blocks(gguf, name, elems)?),
            GgmlDType::Q4_0 => Blocks::Q4_0(read_blocks(gguf, name, elems)?),
            GgmlDType::Q4_1 => Blocks::Q4_1(read_blocks(gguf, name, elems)?),
            GgmlDType::Q5_0 => Blocks::Q5_0(read_blocks(gguf, name, elems)?),
            GgmlDType::Q5_1 => Blocks::Q5_1(read_blocks(gguf, name, elems)?),
            GgmlDType::Q8_0 => Blocks::Q8_0(read_blocks(gguf, name, elems)?),
            GgmlDType::Q2K => Blocks::Q2K(read_blocks(gguf, name, elems)?),
            GgmlDType::Q3K => Blocks::Q3K(read_blocks(gguf, name, elems)?),
            GgmlDType::Q4K => Blocks::Q4K(read_blocks(gguf, name, elems)?),
            GgmlDType::Q5K => Blocks::Q5K(read_blocks(gguf, name, elems)?),
            GgmlDType::Q6K => Blocks::Q6K(read_blocks(gguf, name, elems)?),
            other => {
                return Err(gguf.bad_tensor(name, format!("format {other:?} is not supported")));
            }
        };
        Ok(Self {
            out_features,
            in_features,
            dtype,
            weights: Weights::Candle(blocks),
        })
    }

    /// Reads a vector (a norm weight) as f32.
    pub fn load_vector(gguf: &mut GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
        let lin = Self::load(gguf, name)?;
        if lin.out_features * lin.in_features != len {
            return Err(gguf.bad_tensor(
                name,
                format!(
                    "expected {len} values, found {}",
                    lin.out_features * lin.in_features
                ),
            ));
        }
        let mut v = vec![0f32; len];
        lin.row(0, &mut v[..lin.in_features]);
        if lin.out_features > 1 {
            for r in 1..lin.out_features {
                let s = r * lin.in_features;
                lin.row(r, &mut v[s..s + lin.in_features]);
            }
        }
        Ok(v)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Whether the matmul runs on trail's kernels (else candle's).
    pub fn is_fast(&self) -> bool {
        matches!(self.weights, Weights::Fast(_))
    }

    /// `y[n × out] = x[n × in] · Wᵀ`, each row computed independently of the others, on
    /// [`SimdPath::selected`].
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.forward_on(SimdPath::selected(), x, n, y);
    }

    /// [`Self::forward`] on trail's kernels' SIMD `path` (the same bits on every path; candle's
    /// kernels choose their own).
    pub fn forward_on(&self, path: SimdPath, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.in_features, "QLinear input");
        assert_eq!(y.len(), n * self.out_features, "QLinear output");
        if n == 0 {
            return;
        }
        match &self.weights {
            Weights::Fast(m) => {
                let act = QActivations::quantize_on(path, x, n, self.in_features);
                m.matmul_q_on(path, &act, y);
            }
            Weights::Candle(blocks) => {
                let mkn = (n, self.in_features, self.out_features);
                dispatch!(blocks, b => k_quants::matmul(mkn, x, b, y))
                    .expect("QLinear sizes are checked above");
            }
        }
    }

    /// Several matrices reading the same input (q/k/v, gate/up): `ys[i].1 = x · ys[i].0ᵀ`.
    /// When all run on trail's kernels the input is quantized once and the matmuls share one
    /// parallel region; the bits equal separate [`Self::forward`] calls either way.
    pub fn forward_group(x: &[f32], n: usize, ys: &mut [(&QLinear, &mut [f32])]) {
        Self::forward_group_on(SimdPath::selected(), x, n, ys);
    }

    /// [`Self::forward_group`] on trail's kernels' SIMD `path`.
    pub fn forward_group_on(
        path: SimdPath,
        x: &[f32],
        n: usize,
        ys: &mut [(&QLinear, &mut [f32])],
    ) {
        if n == 0 || ys.is_empty() {
            return;
        }
        let fast: Option<Vec<&QMatrix>> = ys
            .iter()
            .map(|(l, _)| match &l.weights {
                Weights::Fast(m) if l.in_features == ys[0].0.in_features => Some(m),
                _ => None,
            })
            .collect();
        match fast {
            Some(ms) => {
                for (l, y) in ys.iter() {
                    assert_eq!(y.len(), n * l.out_features, "QLinear output");
                }
                let act = QActivations::quantize_on(path, x, n, ys[0].0.in_features);
                let mut group: Vec<(&QMatrix, &mut [f32])> = ms
                    .into_iter()
                    .zip(ys.iter_mut())
                    .map(|(m, (_, y))| (m, &mut **y))
                    .collect();
                trail_kernels::matmul_group_on(path, &act, &mut group);
            }
            None => {
                for (l, y) in ys.iter_mut() {
                    l.forward_on(path, x, n, y);
                }
            }
        }
    }

    /// Dequantizes row `r` (an embedding lookup) into `out` (`in` values).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.out_features, "row {r} of {}", self.out_features);
        fn deq<T: GgmlType>(b: &[T], r: usize, k: usize, out: &mut [f32]) {
            let per_row = k / T::BLCK_SIZE;
            T::to_float(&b[r * per_row..(r + 1) * per_row], out)
        }
        match &self.weights {
            Weights::Fast(m) => m.dequantize_row_into(r, out),
            Weights::Candle(blocks) => dispatch!(blocks, b => deq(b, r, self.in_features, out)),
        }
    }
}

/// The trail-kernels format of a GGUF type, for the types trail-kernels runs (the rest run on
/// candle's kernels).
pub(crate) fn block_format(dtype: GgmlDType) -> Option<BlockFormat> {
    match dtype {
        GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
        GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
        GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
        _ => None,
    }
}

/// The SIMD features the CPU kernels can use here: on x86-64 the CPU's features, detected at
/// run time (trail-kernels and candle's quantized dots choose their code at run time; a build
/// for the baseline x86-64 names the same features as one built for this CPU), elsewhere the
/// target features fixed at compile time; then whether candle's Q8_0/K-quant dots take their
/// AVX2+FMA branch (`rt-avx2fma`).
pub fn simd_path() -> String {
    let mut parts: Vec<&str> = vec![std::env::consts::ARCH];
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! feat {
            ($($f:tt),*) => {$( if std::arch::is_x86_feature_detected!($f) { parts.push($f); } )*};
        }
        feat!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avxvnni"
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        macro_rules! feat {
            ($($f:literal),*) => {$( if cfg!(target_feature = $f) { parts.push($f); } )*};
        }
        feat!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avxvnni",
            "neon",
            "dotprod",
            "i8mm",
            "simd128"
        );
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let rt = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        parts.push(if rt { "rt-avx2fma" } else { "rt-noavx2fma" });
    }
    parts.join("+")
}
