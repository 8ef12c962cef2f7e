//! Seeded training of a [`Probe`].
//!
//! Paper recipe: cross-entropy on the bin label, AdamW (lr 0.01, weight decay 0.01, PyTorch's
//! defaults otherwise), cosine annealing `lr·½(1 + cos(π·e/epochs))` stepped per epoch over 30
//! epochs, batch 32; early stop on validation MAE with `patience`, keeping the best weights.
//! Weights are initialized from a seeded ChaCha8 RNG as PyTorch's `Linear` does
//! (Kaiming-uniform with a = √5, i.e. U(±1/√fan_in), biases likewise), and the epoch order is
//! shuffled with the same RNG, so the same data and seed give bit-identical weights on the same
//! machine. Inputs are standardized batch by batch (no standardized copy of the table).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::bins::{Bins, clamp_remaining};
use crate::probe::{Probe, Standardizer, mlp};
use crate::{Error, Result};

/// Training data as plain arrays: row `r` has features `features[r·dim..(r+1)·dim]` and target
/// length `target[r]` (remaining length for a decode probe, total length for a prompt
/// predictor). `cap[r]`, when given, is `max_new − g`, the clamp of the point estimate, and with
/// bins that have a cap class the room that class reads out (a row whose target reaches it is
/// labelled "runs to the cap").
#[derive(Debug, Clone, Copy)]
pub struct Dataset<'a> {
    pub features: &'a [f32],
    pub dim: usize,
    pub target: &'a [u32],
    pub cap: Option<&'a [u32]>,
}

impl Dataset<'_> {
    pub fn len(&self) -> usize {
        self.target.len()
    }

    pub fn is_empty(&self) -> bool {
        self.target.is_empty()
    }

    fn check(&self) -> Result<()> {
        if self.dim == 0 || self.features.len() != self.target.len() * self.dim {
            return Err(Error::Invalid(format!(
                "features hold {} values, expected {} rows × {}",
                self.features.len(),
                self.target.len(),
                self.dim
            )));
        }
        if let Some(c) = self.cap
            && c.len() != self.target.len()
        {
            return Err(Error::Invalid("cap and target lengths differ".into()));
        }
        Ok(())
    }

    /// sha256 over dim, features, targets and caps (little-endian), hex.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.dim as u64).to_le_bytes());
        for x in self.features {
            h.update(x.to_le_bytes());
        }
        for t in self.target {
            h.update(t.to_le_bytes());
        }
        if let Some(c) = self.cap {
            for t in c {
                h.update(t.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }
}

/// Hyperparameters.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Epochs without a better validation MAE before stopping.
    pub patience: usize,
    pub seed: u64,
    pub std_floor: f32,
    /// Rows per forward pass during evaluation.
    pub eval_batch: usize,
}

impl Default for TrainConfig {
    /// The paper's recipe.
    fn default() -> Self {
        Self {
            hidden: 512,
            epochs: 30,
            batch: 32,
            lr: 0.01,
            weight_decay: 0.01,
            patience: 3,
            seed: 0,
            std_floor: 1e-5,
            eval_batch: 4096,
        }
    }
}

/// One epoch of the training curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_mae: f64,
    pub val_accuracy: f64,
    /// Learning rate used during the epoch.
    pub lr: f64,
    pub seconds: f64,
}

/// What training did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    pub curve: Vec<EpochRecord>,
    /// 1-based epoch of the kept weights.
    pub best_epoch: usize,
    pub best_val_mae: f64,
    /// Training rows per second (optimizer steps only, evaluation excluded).
    pub train_rows_per_s: f64,
}

/// Cosine-annealed learning rate for 0-based epoch `e` of `epochs`.
pub fn cosine_lr(base: f64, e: usize, epochs: usize) -> f64 {
    base * 0.5 * (1.0 + (std::f64::consts::PI * e as f64 / epochs.max(1) as f64).cos())
}

/// Split rows into (train, validation) by a hash of their group (request id), so that all rows
/// of a request fall on one side: a row is in validation when the first 8 bytes of
/// `sha256(seed_le ‖ id)` read as a fraction of 2⁶⁴ are below `val_fraction`.
pub fn split_by_group<S: AsRef<str>>(
    ids: &[S],
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut last: Option<(&str, bool)> = None;
    for (r, id) in ids.iter().enumerate() {
        let id = id.as_ref();
        let in_val = match last {
            Some((l, v)) if l == id => v,
            _ => {
                let mut h = Sha256::new();
                h.update(seed.to_le_bytes());
                h.update(id.as_bytes());
                let d = h.finalize();
                let x = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
                (x as f64 / 18_446_744_073_709_551_616.0) < val_fraction
            }
        };
        last = Some((id, in_val));
        if in_val { val.push(r) } else { train.push(r) }
    }
    (train, val)
}

/// PyTorch `Linear` init: weight and bias U(−1/√fan_in, 1/√fan_in).
fn linear_init(rng: &mut ChaCha8Rng, out: usize, fan_in: usize) -> Result<(Var, Var)> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w: Vec<f32> = (0..out * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-bound..bound)).collect();
    Ok((
        Var::from_tensor(&Tensor::from_vec(w, (out, fan_in), &Device::Cpu)?)?,
        Var::from_tensor(&Tensor::from_vec(b, out, &Device::Cpu)?)?,
    ))
}

/// AdamW with PyTorch's (and candle-nn's) update, fused into one pass per parameter over
/// master copies kept as `Vec<f32>`: `θ ← θ(1 − lr·λ) − lr·m̂/(√v̂ + ε)`, β = (0.9, 0.999),
/// ε = 1e-8. candle-nn's `AdamW` spends about 14 tensor ops (each a fresh allocation) per
/// parameter and step; fused, a 576-d probe trains 2.1× faster at batch 32 (2.2k → 4.6k rows/s
/// on 2 cores) and 2.5× at batch 256 (11k → 28k rows/s).
struct FusedAdamW {
    lr: f64,
    weight_decay: f64,
    t: i32,
    theta: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl FusedAdamW {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[Var], lr: f64, weight_decay: f64) -> Result<Self> {
        let theta = vars
            .iter()
            .map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let zeros: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        Ok(Self {
            lr,
            weight_decay,
            t: 0,
            m: zeros.clone(),
            v: zeros,
            theta,
        })
    }

    fn step(&mut self, vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (Self::BETA1 as f32, Self::BETA2 as f32);
        let scale_m = (1.0 / (1.0 - Self::BETA1.powi(self.t))) as f32;
        let scale_v = (1.0 / (1.0 - Self::BETA2.powi(self.t))) as f32;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let (lr, eps) = (self.lr as f32, Self::EPS as f32);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let (th, m, v) = (&mut self.theta[i], &mut self.m[i], &mut self.v[i]);
            for j in 0..g.len() {
                m[j] = m[j] * b1 + g[j] * (1.0 - b1);
                v[j] = v[j] * b2 + g[j] * g[j] * (1.0 - b2);
                let step = (m[j] * scale_m) / ((v[j] * scale_v).sqrt() + eps);
                th[j] = th[j] * decay - step * lr;
            }
            var.set(&Tensor::from_slice(th, var.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }
}

/// Gather and standardize `rows` into an n×d tensor, with their labels.
fn batch(
    data: &Dataset<'_>,
    st: &Standardizer,
    bins: &Bins,
    rows: &[usize],
    buf: &mut Vec<f32>,
) -> Result<(Tensor, Tensor)> {
    let d = data.dim;
    buf.resize(rows.len() * d, 0.0);
    for (o, &r) in buf.chunks_exact_mut(d).zip(rows) {
        st.apply_into(&data.features[r * d..(r + 1) * d], o);
    }
    let labels: Vec<u32> = rows.iter().map(|&r| label(data, bins, r)).collect();
    Ok((
        Tensor::from_slice(buf, (rows.len(), d), &Device::Cpu)?,
        Tensor::from_vec(labels, rows.len(), &Device::Cpu)?,
    ))
}

/// The label of row `r`: its target's bin, or the cap class where the target reaches its cap.
fn label(data: &Dataset<'_>, bins: &Bins, r: usize) -> u32 {
    match data.cap {
        Some(c) => bins.label_at(data.target[r], c[r]),
        None => bins.label(data.target[r]),
    }
}

/// Validation metrics of a probe on `rows`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    /// Mean |point estimate − target| (estimate clamped to `cap` when given).
    pub mae: f64,
    /// Argmax bin == label.
    pub accuracy: f64,
}

/// Loss, MAE and accuracy of `probe` on `rows` of `data`.
pub fn evaluate(
    probe: &Probe,
    data: &Dataset<'_>,
    rows: &[usize],
    bins: &Bins,
    eval_batch: usize,
) -> Result<Metrics> {
    data.check()?;
    eval_parts(
        data,
        rows,
        bins,
        eval_batch,
        &probe.standardizer,
        [&probe.w1, &probe.b1, &probe.w2, &probe.b2],
    )
}

fn eval_parts(
    data: &Dataset<'_>,
    rows: &[usize],
    bins: &Bins,
    eval_batch: usize,
    st: &Standardizer,
    w: [&Tensor; 4],
) -> Result<Metrics> {
    let k = bins.k();
    let (mut loss, mut abs, mut hits) = (0f64, 0f64, 0usize);
    let mut buf = Vec::new();
    for chunk in rows.chunks(eval_batch.max(1)) {
        let (x, y) = batch(data, st, bins, chunk, &mut buf)?;
        let logits = mlp(&x, w[0], w[1], w[2], w[3])?;
        loss += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
            * chunk.len() as f64;
        let p: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits)?
            .flatten_all()?
            .to_vec1()?;
        for (pr, &r) in p.chunks_exact(k).zip(chunk) {
            let e = match data.cap {
                Some(c) => clamp_remaining(bins.readout(pr, f64::from(c[r])), 0, c[r]),
                None => bins.expectation(pr).max(0.0),
            };
            abs += (e - data.target[r] as f64).abs();
            let arg = pr
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0;
            hits += (arg as u32 == label(data, bins, r)) as usize;
        }
    }
    let n = rows.len().max(1) as f64;
    Ok(Metrics {
        loss: loss / n,
        mae: abs / n,
        accuracy: hits as f64 / n,
    })
}

/// Train a probe on `train_rows`, early-stopping on the MAE over `val_rows`.
pub fn train_probe(
    data: &Dataset<'_>,
    train_rows: &[usize],
    val_rows: &[usize],
    bins: &Bins,
    cfg: &TrainConfig,
) -> Result<(Probe, TrainReport)> {
    data.check()?;
    if train_rows.is_empty() || val_rows.is_empty() {
        return Err(Error::Invalid(
            "training needs non-empty train and validation rows".into(),
        ));
    }
    if cfg.batch == 0 || cfg.epochs == 0 || cfg.hidden == 0 {
        return Err(Error::Invalid(
            "batch, epochs and hidden must be positive".into(),
        ));
    }
    let d = data.dim;
    let st = Standardizer::fit(data.features, d, train_rows, cfg.std_floor);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (w1, b1) = linear_init(&mut rng, cfg.hidden, d)?;
    let (w2, b2) = linear_init(&mut rng, bins.k(), cfg.hidden)?;
    let vars = [w1, b1, w2, b2];
    let mut opt = FusedAdamW::new(&vars, cfg.lr, cfg.weight_decay)?;
    let snapshot = |v: &[Var; 4]| -> Result<[Tensor; 4]> {
        Ok([
            v[0].as_tensor().copy()?,
            v[1].as_tensor().copy()?,
            v[2].as_tensor().copy()?,
            v[3].as_tensor().copy()?,
        ])
    };
    let mut best = snapshot(&vars)?;
    let (mut best_mae, mut best_epoch, mut stale) = (f64::INFINITY, 0, 0);
    let mut curve = Vec::new();
    let mut order = train_rows.to_vec();
    let mut buf = Vec::new();
    let (mut train_secs, mut train_seen) = (0f64, 0usize);
    for e in 0..cfg.epochs {
        let t0 = Instant::now();
        let lr = cosine_lr(cfg.lr, e, cfg.epochs);
        opt.lr = lr;
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for chunk in order.chunks(cfg.batch) {
            let (x, y) = batch(data, &st, bins, chunk, &mut buf)?;
            let logits = mlp(
                &x,
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                vars[3].as_tensor(),
            )?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.step(&vars, &loss.backward()?)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        train_secs += t0.elapsed().as_secs_f64();
        train_seen += order.len();
        let m = eval_parts(
            data,
            val_rows,
            bins,
            cfg.eval_batch,
            &st,
            [
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                vars[3].as_tensor(),
            ],
        )?;
        curve.push(EpochRecord {
            epoch: e + 1,
            train_loss: loss_sum / order.len() as f64,
            val_loss: m.loss,
            val_mae: m.mae,
            val_accuracy: m.accuracy,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
        });
        if m.mae < best_mae {
            best_mae = m.mae;
            best_epoch = e + 1;
            best = snapshot(&vars)?;
            stale = 0;
        } else {
            stale += 1;
            if stale >= cfg.patience {
                break;
            }
        }
    }
    let [w1, b1, w2, b2] = best;
    let probe = Probe::new(st, w1, b1, w2, b2)?;
    Ok((
        probe,
        TrainReport {
            curve,
            best_epoch,
            best_val_mae: best_mae,
            train_rows_per_s: train_seen as f64 / train_secs.max(1e-9),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_release_history() {
        // The release's training_history.json: 0.009973, 0.009891, 0.009755 after epochs 1–3.
        for (e, want) in [(1, 0.009973), (2, 0.009891), (3, 0.009755)] {
            assert!((cosine_lr(0.01, e, 30) - want).abs() < 5e-7);
        }
        assert_eq!(cosine_lr(0.01, 0, 30), 0.01);
    }

    #[test]
    fn split_keeps_groups_together_and_is_seeded() {
        let ids: Vec<String> = (0..2000)
            .flat_map(|i| std::iter::repeat_n(format!("req-{i}"), 3))
            .collect();
        let (tr, va) = split_by_group(&ids, 0.1, 0);
        assert_eq!(tr.len() + va.len(), ids.len());
        let frac = va.len() as f64 / ids.len() as f64;
        assert!((0.07..0.13).contains(&frac), "{frac}");
        let val_ids: std::collections::HashSet<&String> = va.iter().map(|&r| &ids[r]).collect();
        assert!(tr.iter().all(|&r| !val_ids.contains(&ids[r])));
        assert_eq!(split_by_group(&ids, 0.1, 0).1, va);
        assert_ne!(split_by_group(&ids, 0.1, 1).1, va);
    }

    #[test]
    fn fused_adamw_matches_candle_adamw() {
        use candle_nn::{AdamW, Optimizer, ParamsAdamW};
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (wa, ba) = linear_init(&mut rng, 5, 7).unwrap();
        let (wb, bb) = (
            Var::from_tensor(&wa.as_tensor().copy().unwrap()).unwrap(),
            Var::from_tensor(&ba.as_tensor().copy().unwrap()).unwrap(),
        );
        let w0: Vec<f32> = wa.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let x = Tensor::from_vec(
            (0..21).map(|i| (i as f32 * 0.37).sin()).collect(),
            (3, 7),
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
        let loss = |w: &Var, b: &Var| {
            let l = x
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            candle_nn::loss::cross_entropy(&l, &y).unwrap()
        };
        let mut reference = AdamW::new(
            vec![wa.clone(), ba.clone()],
            ParamsAdamW {
                lr: 0.01,
                weight_decay: 0.01,
                ..Default::default()
            },
        )
        .unwrap();
        let fused_vars = [wb.clone(), bb.clone()];
        let mut fused = FusedAdamW::new(&fused_vars, 0.01, 0.01).unwrap();
        for step in 0..5 {
            if step == 3 {
                reference.set_learning_rate(0.003);
                fused.lr = 0.003;
            }
            reference.backward_step(&loss(&wa, &ba)).unwrap();
            fused
                .step(&fused_vars, &loss(&wb, &bb).backward().unwrap())
                .unwrap();
        }
        // The parameters moved, by more than the tolerance below.
        let w5: Vec<f32> = wa.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(w0.iter().zip(&w5).all(|(a, b)| (a - b).abs() > 1e-3));
        for (a, b) in [(&wa, &wb), (&ba, &bb)] {
            let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        }
    }
}
