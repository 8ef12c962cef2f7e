//! The MLP probe: standardize → Linear(d, h) → ReLU → Linear(h, k) → softmax.
//!
//! The paper's head (h = 512, k = 10) on one decoder layer's hidden state of the newest token.
//! A multi-layer probe is the same MLP on features concatenated from 2–3 layers
//! ([`concat_features`]); the layers a probe reads are recorded in the checkpoint metadata.
//! Standardization (train mean and std, std floored) is kept with the weights.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Per-feature standardization `(x − mean) / std`.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Fit on rows `rows` of `features` (n×d, row-major); std floored at `floor`.
    pub fn fit(features: &[f32], dim: usize, rows: &[usize], floor: f32) -> Self {
        let mut mean = vec![0f64; dim];
        let mut sq = vec![0f64; dim];
        for &r in rows {
            let x = &features[r * dim..(r + 1) * dim];
            for j in 0..dim {
                let v = x[j] as f64;
                mean[j] += v;
                sq[j] += v * v;
            }
        }
        let n = rows.len().max(1) as f64;
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| ((s / n - m * m).max(0.0).sqrt() as f32).max(floor))
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Standardize one row into `out`.
    pub fn apply_into(&self, x: &[f32], out: &mut [f32]) {
        for ((o, &v), (&m, &s)) in out.iter_mut().zip(x).zip(self.mean.iter().zip(&self.std)) {
            *o = (v - m) / s;
        }
    }
}

/// A trained probe (weights in PyTorch's `Linear` layout: `w1` is h×d, `w2` is k×h).
#[derive(Debug, Clone)]
pub struct Probe {
    pub standardizer: Standardizer,
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
}

impl Probe {
    /// Assemble from parts, checking shapes.
    pub fn new(
        standardizer: Standardizer,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
    ) -> Result<Self> {
        let d = standardizer.dim();
        let (h, d1) = w1.dims2()?;
        let (k, h2) = w2.dims2()?;
        if d1 != d || h2 != h || b1.dims1()? != h || b2.dims1()? != k || standardizer.std.len() != d
        {
            return Err(Error::Invalid(format!(
                "probe shapes disagree: d={d}, w1 {:?}, b1 {:?}, w2 {:?}, b2 {:?}",
                w1.dims(),
                b1.dims(),
                w2.dims(),
                b2.dims()
            )));
        }
        Ok(Self {
            standardizer,
            w1,
            b1,
            w2,
            b2,
        })
    }

    /// Input dimension d.
    pub fn dim(&self) -> usize {
        self.standardizer.dim()
    }

    /// Hidden width h.
    pub fn hidden(&self) -> usize {
        self.w1.dims()[0]
    }

    /// Number of bins k.
    pub fn k(&self) -> usize {
        self.w2.dims()[0]
    }

    /// Logits of standardized inputs `x` (n×d tensor).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(mlp(x, &self.w1, &self.b1, &self.w2, &self.b2)?)
    }

    /// Standardize raw rows (n×d, row-major) into a tensor.
    pub fn standardize(&self, features: &[f32]) -> Result<Tensor> {
        let d = self.dim();
        if !features.len().is_multiple_of(d) {
            return Err(Error::Invalid(format!(
                "features length {} is not a multiple of d = {d}",
                features.len()
            )));
        }
        let n = features.len() / d;
        let mut buf = vec![0f32; features.len()];
        for (x, o) in features.chunks_exact(d).zip(buf.chunks_exact_mut(d)) {
            self.standardizer.apply_into(x, o);
        }
        Ok(Tensor::from_vec(buf, (n, d), &Device::Cpu)?)
    }

    /// Bin probabilities for many rows at once: `features` is n×d row-major, result n×k.
    pub fn predict_proba(&self, features: &[f32]) -> Result<Vec<f32>> {
        if features.is_empty() {
            return Ok(Vec::new());
        }
        let x = self.standardize(features)?;
        let p = candle_nn::ops::softmax_last_dim(&self.logits(&x)?)?;
        Ok(p.flatten_all()?.to_vec1::<f32>()?)
    }

    /// All parameters as f32 vectors `[w1, b1, w2, b2]` (for comparisons and export).
    pub fn weights(&self) -> Result<[Vec<f32>; 4]> {
        let v = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        Ok([v(&self.w1)?, v(&self.b1)?, v(&self.w2)?, v(&self.b2)?])
    }
}

/// `relu(x·w1ᵀ + b1)·w2ᵀ + b2`.
pub(crate) fn mlp(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> candle_core::Result<Tensor> {
    x.matmul(&w1.t()?)?
        .broadcast_add(b1)?
        .relu()?
        .matmul(&w2.t()?)?
        .broadcast_add(b2)
}

/// Concatenate per-layer feature tables (each n×d_i, row-major) into one n×Σd_i table.
pub fn concat_features(layers: &[(&[f32], usize)]) -> Result<Vec<f32>> {
    let Some(&(first, d0)) = layers.first() else {
        return Ok(Vec::new());
    };
    let n = first.len() / d0.max(1);
    let total: usize = layers.iter().map(|&(_, d)| d).sum();
    for &(x, d) in layers {
        if d == 0 || x.len() != n * d {
            return Err(Error::Invalid(format!(
                "layer table of {} values is not {n}×{d}",
                x.len()
            )));
        }
    }
    let mut out = Vec::with_capacity(n * total);
    for r in 0..n {
        for &(x, d) in layers {
            out.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardizer_floors_constant_features() {
        // Feature 0: 1, 3 → mean 2, std 1. Feature 1 constant 5 → std floored.
        let x = [1.0, 5.0, 3.0, 5.0];
        let s = Standardizer::fit(&x, 2, &[0, 1], 1e-3);
        assert_eq!(s.mean, vec![2.0, 5.0]);
        assert_eq!(s.std, vec![1.0, 1e-3]);
        let mut o = [0.0; 2];
        s.apply_into(&[4.0, 5.0], &mut o);
        assert_eq!(o, [2.0, 0.0]);
    }

    #[test]
    fn concat_interleaves_rows() {
        let a = [1.0, 2.0, 3.0, 4.0]; // 2×2
        let b = [9.0, 8.0]; // 2×1
        assert_eq!(
            concat_features(&[(&a, 2), (&b, 1)]).unwrap(),
            vec![1.0, 2.0, 9.0, 3.0, 4.0, 8.0]
        );
        assert!(concat_features(&[(&a, 2), (&b, 2)]).is_err());
    }
}
