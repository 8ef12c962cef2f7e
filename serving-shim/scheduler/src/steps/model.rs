//! The step-time model: a step's seconds as a linear function of its shape, fitted to a step
//! log ([`StepRecord`]s, `steps.parquet`). The trace-driven simulator times its steps with it,
//! and so does the engine on [`VirtualTime`](crate::clock::VirtualTime); `trail eval latency`
//! stores the fit as `step_model.json` (the four coefficients by name).

use serde::{Deserialize, Serialize};

use super::StepRecord;
use crate::error::StepModelError;

/// One logged model step: its shape and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepSample {
    /// Rows (decodes + prefill chunks). Logged for reference, not a feature of the fit (it is
    /// the decode rows plus the number of chunks).
    pub rows: usize,
    /// Decode rows (one token each).
    pub decode_rows: usize,
    /// Prefill tokens over all chunks.
    pub prefill_tokens: usize,
    /// KV tokens attended: context held by the step's rows after it ran.
    pub kv_tokens: usize,
    /// Seconds the step took.
    pub secs: f64,
}

impl From<&StepRecord> for StepSample {
    /// A step of the engine's (or `trail bench runner`'s) log, `steps.parquet`: the whole
    /// step's time, predictor and bookkeeping included, since that is what a request waits.
    fn from(r: &StepRecord) -> Self {
        Self {
            rows: r.rows,
            decode_rows: r.decode_rows,
            prefill_tokens: r.prefill_tokens,
            kv_tokens: r.kv_tokens,
            secs: r.step_secs,
        }
    }
}

/// Step time as a linear function of the step's shape:
/// `base_s + per_decode_row_s·decode_rows + per_prefill_token_s·prefill_tokens +
/// per_kv_token_s·kv_tokens`, every coefficient ≥ 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepTimeModel {
    pub base_s: f64,
    pub per_decode_row_s: f64,
    pub per_prefill_token_s: f64,
    pub per_kv_token_s: f64,
}

impl StepTimeModel {
    /// A constant step time (tests, back-of-envelope runs).
    pub fn constant(secs: f64) -> Self {
        Self {
            base_s: secs,
            per_decode_row_s: 0.0,
            per_prefill_token_s: 0.0,
            per_kv_token_s: 0.0,
        }
    }

    /// Ordinary least squares on the four features (intercept, decode rows, prefill tokens, KV
    /// tokens) by the normal equations, columns scaled for conditioning. A negative coefficient
    /// is clamped: its feature is dropped and the rest refitted, until all are ≥ 0.
    pub fn fit(samples: &[StepSample]) -> Result<Self, StepModelError> {
        if samples.is_empty() {
            return Err(StepModelError::NoSteps);
        }
        if let Some(s) = samples.iter().find(|s| !s.secs.is_finite() || s.secs < 0.0) {
            return Err(StepModelError::BadStepTime(s.secs));
        }
        let x: Vec<[f64; 4]> = samples
            .iter()
            .map(|s| {
                [
                    1.0,
                    s.decode_rows as f64,
                    s.prefill_tokens as f64,
                    s.kv_tokens as f64,
                ]
            })
            .collect();
        let y: Vec<f64> = samples.iter().map(|s| s.secs).collect();
        // Scale each column by its largest magnitude; a column of zeros is inactive.
        let mut scale = [0.0f64; 4];
        for row in &x {
            for (m, v) in scale.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let mut active: Vec<usize> = (0..4).filter(|&j| scale[j] > 0.0).collect();
        loop {
            let beta = solve_ols(&x, &y, &scale, &active);
            let worst = active
                .iter()
                .zip(&beta)
                .filter(|(_, b)| **b < 0.0)
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(&j, _)| j);
            match worst {
                Some(j) => active.retain(|&k| k != j),
                None => {
                    let mut c = [0.0; 4];
                    for (&j, b) in active.iter().zip(&beta) {
                        c[j] = b / scale[j];
                    }
                    return Ok(Self {
                        base_s: c[0],
                        per_decode_row_s: c[1],
                        per_prefill_token_s: c[2],
                        per_kv_token_s: c[3],
                    });
                }
            }
        }
    }

    /// [`fit`](Self::fit) on a step log ([`steps::read`](super::read)).
    pub fn fit_log(records: &[StepRecord]) -> Result<Self, StepModelError> {
        let samples: Vec<StepSample> = records.iter().map(StepSample::from).collect();
        Self::fit(&samples)
    }

    /// Every coefficient times `factor`: the same engine `factor` times slower.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            base_s: self.base_s * factor,
            per_decode_row_s: self.per_decode_row_s * factor,
            per_prefill_token_s: self.per_prefill_token_s * factor,
            per_kv_token_s: self.per_kv_token_s * factor,
        }
    }

    /// Predicted seconds of a step of this shape.
    pub fn predict(&self, decode_rows: usize, prefill_tokens: usize, kv_tokens: usize) -> f64 {
        self.base_s
            + self.per_decode_row_s * decode_rows as f64
            + self.per_prefill_token_s * prefill_tokens as f64
            + self.per_kv_token_s * kv_tokens as f64
    }
}

/// OLS coefficients (in scaled units) of the `active` columns; a singular system gives 0 for the
/// columns whose pivots vanish.
fn solve_ols(x: &[[f64; 4]], y: &[f64], scale: &[f64; 4], active: &[usize]) -> Vec<f64> {
    let k = active.len();
    if k == 0 {
        return Vec::new();
    }
    // Augmented normal equations [XᵀX | Xᵀy].
    let mut a = vec![vec![0.0f64; k + 1]; k];
    for (row, &yi) in x.iter().zip(y) {
        let z: Vec<f64> = active.iter().map(|&j| row[j] / scale[j]).collect();
        for (ai, &zi) in a.iter_mut().zip(&z) {
            for (aij, &zj) in ai.iter_mut().zip(&z) {
                *aij += zi * zj;
            }
            ai[k] += zi * yi;
        }
    }
    // Gaussian elimination with partial pivoting.
    let tol = 1e-12 * (0..k).map(|i| a[i][i]).fold(0.0, f64::max).max(1e-300);
    let mut pivot_ok = vec![true; k];
    for col in 0..k {
        let p = (col..k)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty");
        a.swap(col, p);
        if a[col][col].abs() <= tol {
            pivot_ok[col] = false;
            continue;
        }
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                if f != 0.0 {
                    for (x, p) in row[col..=k].iter_mut().zip(&pivot[col..=k]) {
                        *x -= f * p;
                    }
                }
            }
        }
    }
    (0..k)
        .map(|i| if pivot_ok[i] { a[i][k] / a[i][i] } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn fit_recovers_known_coefficients() {
        let truth = StepTimeModel {
            base_s: 0.012,
            per_decode_row_s: 3e-4,
            per_prefill_token_s: 5e-5,
            per_kv_token_s: 2e-7,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        use rand::Rng;
        let samples: Vec<StepSample> = (0..500)
            .map(|_| {
                let decode_rows = rng.random_range(0..64);
                let prefill_tokens = rng.random_range(0..2048);
                let kv_tokens = rng.random_range(0..100_000);
                let noise = rng.random_range(-1e-5..1e-5);
                StepSample {
                    rows: decode_rows + 1,
                    decode_rows,
                    prefill_tokens,
                    kv_tokens,
                    secs: truth.predict(decode_rows, prefill_tokens, kv_tokens) + noise,
                }
            })
            .collect();
        let fit = StepTimeModel::fit(&samples).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 0.02 * b;
        assert!(close(fit.base_s, truth.base_s), "{fit:?}");
        assert!(
            close(fit.per_decode_row_s, truth.per_decode_row_s),
            "{fit:?}"
        );
        assert!(
            close(fit.per_prefill_token_s, truth.per_prefill_token_s),
            "{fit:?}"
        );
        assert!(close(fit.per_kv_token_s, truth.per_kv_token_s), "{fit:?}");
    }

    #[test]
    fn fit_reads_the_engine_step_log() {
        // A step log as the engine writes it, through steps.parquet, fits the same model as the
        // samples it holds.
        let truth = StepTimeModel {
            base_s: 0.01,
            per_decode_row_s: 4e-4,
            per_prefill_token_s: 6e-5,
            per_kv_token_s: 1e-7,
        };
        let records: Vec<StepRecord> = (0..200u64)
            .map(|i| {
                let decode_rows = (i * 7 % 48) as usize;
                let prefill_tokens = (i * 131 % 700) as usize;
                let kv_tokens = (i * 977 % 20_000) as usize;
                let secs = truth.predict(decode_rows, prefill_tokens, kv_tokens);
                StepRecord {
                    step: i,
                    t: i as f64 * 0.02,
                    rows: decode_rows + usize::from(prefill_tokens > 0),
                    decode_rows,
                    prefill_tokens,
                    kv_tokens,
                    kv_blocks: kv_tokens.div_ceil(16),
                    running: decode_rows,
                    waiting: 0,
                    layers: 1,
                    preempted_policy: 0,
                    preempted_memory: 0,
                    step_secs: secs,
                    forward_secs: 0.9 * secs,
                    predictor_secs: 1e-6,
                }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.parquet");
        super::super::write(&path, &records).unwrap();
        let read = super::super::read(&path).unwrap();
        let fit = StepTimeModel::fit_log(&read).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b;
        assert!(close(fit.base_s, truth.base_s), "{fit:?}");
        assert!(
            close(fit.per_decode_row_s, truth.per_decode_row_s),
            "{fit:?}"
        );
        assert!(
            close(fit.per_prefill_token_s, truth.per_prefill_token_s),
            "{fit:?}"
        );
        assert!(close(fit.per_kv_token_s, truth.per_kv_token_s), "{fit:?}");
    }

    #[test]
    fn fit_clamps_negative_coefficients_and_handles_missing_features() {
        // Time falls with KV tokens: OLS would give a negative slope; the clamp drops it.
        let samples: Vec<StepSample> = (0..20)
            .map(|i| StepSample {
                rows: 1,
                decode_rows: i,
                prefill_tokens: 0,
                kv_tokens: 100 * (i % 5),
                secs: 0.01 + 1e-3 * i as f64 - 2e-6 * (100 * (i % 5)) as f64,
            })
            .collect();
        let fit = StepTimeModel::fit(&samples).unwrap();
        for c in [
            fit.base_s,
            fit.per_decode_row_s,
            fit.per_prefill_token_s,
            fit.per_kv_token_s,
        ] {
            assert!(c >= 0.0 && c.is_finite(), "{fit:?}");
        }
        assert_eq!(fit.per_prefill_token_s, 0.0);
        assert_eq!(fit.per_kv_token_s, 0.0);
        assert!(fit.per_decode_row_s > 5e-4, "{fit:?}");
        assert!(StepTimeModel::fit(&[]).is_err());
    }

    #[test]
    fn step_model_json_round_trips_byte_for_byte() {
        // reports/latency-smollm2/virtual/step_model.json, as `trail eval latency` wrote it
        // (serde_json::to_string_pretty): the fields keep their names, order and digits.
        let committed = "{\n  \"base_s\": 0.0034665358151031987,\n  \"per_decode_row_s\": 0.004345739195633791,\n  \"per_prefill_token_s\": 0.0034482199392889793,\n  \"per_kv_token_s\": 8.259237433981262e-6\n}";
        let model: StepTimeModel = serde_json::from_str(committed).unwrap();
        assert_eq!(model.base_s, 0.0034665358151031987);
        assert_eq!(serde_json::to_string_pretty(&model).unwrap(), committed);
    }
}
