//! The step-time model: a step's seconds as a linear function of its shape ([`StepShape`]),
//! fitted to a step log ([`StepRecord`]s, `steps.parquet`) or derived for another machine (the
//! GPU models under `reports/latency-smollm2/step-models/`). The trace-driven simulator times
//! its steps with it, and so does the engine on [`VirtualTime`](crate::clock::VirtualTime);
//! `trail eval latency` stores it as `step_model.json`.
//!
//! The file is the model's JSON: the four fitted coefficients by name (`base_s`,
//! `per_decode_row_s`, `per_prefill_token_s`, `per_kv_token_s`), and two optional fields that a
//! fit never sets and that are written only when set, so a fitted model's file is unchanged:
//! `per_swap_token_s` (seconds per KV token copied to or from the swap pool; absent: 0) and
//! `kv_capacity_tokens` (the KV cache the machine holds; absent: none said).

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

/// What a step's time depends on. [`Scheduler::step_shape`](crate::scheduler::Scheduler::step_shape)
/// reads it off a planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepShape {
    /// Decode rows (one token each).
    pub decode_rows: usize,
    /// Prefill tokens over all chunks.
    pub prefill_tokens: usize,
    /// KV tokens the rows attend (each row's context once it has run).
    pub kv_tokens: usize,
    /// KV tokens copied between the KV pool and the swap pool: swapped out by the step's
    /// preemptions plus swapped back in by its re-admissions.
    pub swapped_tokens: usize,
}

/// Step time as a linear function of the step's shape:
/// `base_s + per_decode_row_s·decode_rows + per_prefill_token_s·prefill_tokens +
/// per_kv_token_s·kv_tokens + per_swap_token_s·swapped_tokens`, every coefficient ≥ 0; and,
/// optionally, the KV capacity of the machine it describes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepTimeModel {
    pub base_s: f64,
    pub per_decode_row_s: f64,
    pub per_prefill_token_s: f64,
    pub per_kv_token_s: f64,
    /// Seconds per KV token copied between the KV pool and the swap pool, either way: a
    /// request swapped out and back in pays it twice per token. A GPU copies over PCIe; on a
    /// CPU the cache stays in RAM and a swap costs nothing (0, the default, not written).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub per_swap_token_s: f64,
    /// KV-cache capacity in tokens of the machine the model describes (a GPU's memory after
    /// the weights), if it says. Where given it is the engine's KV budget: it replaces
    /// `--kv-budget-tokens`. Not written when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_capacity_tokens: Option<usize>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl StepTimeModel {
    /// A constant step time (tests, back-of-envelope runs).
    pub fn constant(secs: f64) -> Self {
        Self::linear(secs, 0.0, 0.0, 0.0)
    }

    /// The four fitted coefficients; no swap cost, no capacity.
    pub fn linear(
        base_s: f64,
        per_decode_row_s: f64,
        per_prefill_token_s: f64,
        per_kv_token_s: f64,
    ) -> Self {
        Self {
            base_s,
            per_decode_row_s,
            per_prefill_token_s,
            per_kv_token_s,
            per_swap_token_s: 0.0,
            kv_capacity_tokens: None,
        }
    }

    /// Checks a model read from a file: every coefficient finite and ≥ 0, a capacity of at
    /// least one token.
    pub fn check(&self) -> Result<(), StepModelError> {
        let coefficients = [
            ("base_s", self.base_s),
            ("per_decode_row_s", self.per_decode_row_s),
            ("per_prefill_token_s", self.per_prefill_token_s),
            ("per_kv_token_s", self.per_kv_token_s),
            ("per_swap_token_s", self.per_swap_token_s),
        ];
        if let Some((name, v)) = coefficients
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
        {
            return Err(StepModelError::BadCoefficient { name, value: v });
        }
        if self.kv_capacity_tokens == Some(0) {
            return Err(StepModelError::NoCapacity);
        }
        Ok(())
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
                    return Ok(Self::linear(c[0], c[1], c[2], c[3]));
                }
            }
        }
    }

    /// [`fit`](Self::fit) on a step log ([`steps::read`](super::read)).
    pub fn fit_log(records: &[StepRecord]) -> Result<Self, StepModelError> {
        let samples: Vec<StepSample> = records.iter().map(StepSample::from).collect();
        Self::fit(&samples)
    }

    /// Every coefficient times `factor`: the same engine `factor` times slower (the same
    /// capacity).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            base_s: self.base_s * factor,
            per_decode_row_s: self.per_decode_row_s * factor,
            per_prefill_token_s: self.per_prefill_token_s * factor,
            per_kv_token_s: self.per_kv_token_s * factor,
            per_swap_token_s: self.per_swap_token_s * factor,
            kv_capacity_tokens: self.kv_capacity_tokens,
        }
    }

    /// Seconds of a step of this shape, swaps included: what the simulator and the engine on
    /// virtual time charge.
    pub fn step_secs(&self, shape: &StepShape) -> f64 {
        self.predict(shape.decode_rows, shape.prefill_tokens, shape.kv_tokens)
            + self.per_swap_token_s * shape.swapped_tokens as f64
    }

    /// Seconds of a step of this shape without swaps (the fitted features of a step log).
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
        let truth = StepTimeModel::linear(0.012, 3e-4, 5e-5, 2e-7);
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
        let truth = StepTimeModel::linear(0.01, 4e-4, 6e-5, 1e-7);
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

    #[test]
    fn swap_cost_and_capacity_are_optional_and_round_trip() {
        // A fitted model reads with no swap cost and no capacity, and writes neither.
        let fitted: StepTimeModel = serde_json::from_str(
            r#"{"base_s": 0.5, "per_decode_row_s": 0.25, "per_prefill_token_s": 0.125, "per_kv_token_s": 0.0625}"#,
        )
        .unwrap();
        assert_eq!(fitted, StepTimeModel::linear(0.5, 0.25, 0.125, 0.0625));
        assert!(!serde_json::to_string(&fitted).unwrap().contains("swap"));
        // A machine's model with both, written back field for field.
        let gpu = StepTimeModel {
            per_swap_token_s: 5.12e-6,
            kv_capacity_tokens: Some(434_512),
            ..fitted
        };
        let text = serde_json::to_string_pretty(&gpu).unwrap();
        assert!(
            text.ends_with("\"per_swap_token_s\": 5.12e-6,\n  \"kv_capacity_tokens\": 434512\n}")
        );
        assert_eq!(serde_json::from_str::<StepTimeModel>(&text).unwrap(), gpu);
        gpu.check().unwrap();
    }

    #[test]
    fn a_step_pays_for_the_tokens_it_swaps() {
        let m = StepTimeModel {
            per_swap_token_s: 0.001,
            ..StepTimeModel::linear(0.5, 0.25, 0.125, 0.0625)
        };
        let shape = StepShape {
            decode_rows: 2,
            prefill_tokens: 4,
            kv_tokens: 8,
            swapped_tokens: 0,
        };
        assert_eq!(m.step_secs(&shape), m.predict(2, 4, 8));
        let swapping = StepShape {
            swapped_tokens: 250,
            ..shape
        };
        assert_eq!(m.step_secs(&swapping), 2.0 + 0.25);
        // Scaling keeps the capacity and scales the swap cost.
        let slower = StepTimeModel {
            kv_capacity_tokens: Some(64),
            ..m
        }
        .scaled(2.0);
        assert_eq!(slower.step_secs(&swapping), 4.5);
        assert_eq!(slower.kv_capacity_tokens, Some(64));
    }

    #[test]
    fn a_model_from_a_file_is_checked() {
        let bad = StepTimeModel {
            per_swap_token_s: -1e-6,
            ..StepTimeModel::constant(0.01)
        };
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("per_swap_token_s")
        );
        let nan = StepTimeModel::linear(0.01, f64::NAN, 0.0, 0.0);
        assert!(
            nan.check()
                .unwrap_err()
                .to_string()
                .contains("per_decode_row_s")
        );
        let empty = StepTimeModel {
            kv_capacity_tokens: Some(0),
            ..StepTimeModel::constant(0.01)
        };
        assert_eq!(empty.check(), Err(StepModelError::NoCapacity));
    }
}
