//! The fine-tuned BERT baseline: all-MiniLM-L6-v2 trained end to end with the length head.
//!
//! The paper's baseline is a BERT fine-tuned on the prompt to predict the output length (the
//! release: DistilBERT, 10 bins, lr 2e-5 decayed linearly, a few epochs). Here the encoder is
//! the frozen baseline's all-MiniLM-L6-v2 ([`crate::bert`]); pooled as sentence-transformers
//! does (masked mean), then the probe's head `Linear(384, 512) → ReLU → Linear(512, k)`,
//! trained with cross-entropy on total-length bins.
//!
//! Why not candle-transformers' `BertModel`: its `LayerNorm` takes candle-nn's fused layer-norm
//! op on contiguous inputs, and that op has no backward pass, so gradients cannot flow through
//! it. [`TunableBert`] is the same forward (tensor names as in HF's `BertModel`, GELU (erf),
//! attention mask as `−10⁴` on padding) with the layer norm written in tensor ops. Its
//! outputs match `BertModel`'s within 1e-4 (test below).
//!
//! Training: the encoder layers and the embedding layer norm at `lr` (2e-5), the head, freshly
//! initialized from the seed, at `head_lr` (1e-3); AdamW (weight decay 0.01), both rates
//! decayed linearly to zero over all steps; batches of `batch` prompts in seeded order, padded
//! to the longest. The word, position and token-type embedding tables stay frozen: the word
//! table is half the parameters and its gradient would be a dense 30522×384 scatter per step.
//! The epoch with the best validation MAE (expectation readout of total length) is kept.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Embedding, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_transformers::models::bert::Config;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::bins::Bins;
use crate::train::{EpochRecord, TrainReport};
use crate::{Error, Result};

/// Fine-tuning hyperparameters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TuneConfig {
    pub epochs: usize,
    pub batch: usize,
    /// Learning rate of the encoder.
    pub lr: f64,
    /// Learning rate of the freshly initialized head.
    pub head_lr: f64,
    pub weight_decay: f64,
    /// Prompt tokens kept (truncation).
    pub max_len: usize,
    /// Hidden width of the head.
    pub head_hidden: usize,
    pub seed: u64,
}

impl Default for TuneConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch: 16,
            lr: 2e-5,
            head_lr: 1e-3,
            weight_decay: 0.01,
            max_len: 256,
            head_hidden: 512,
            seed: 0,
        }
    }
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(n: usize, eps: f64, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(n, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(n, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    /// Layer norm in differentiable tensor ops.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
    heads: usize,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let lin = |i, o, vb| candle_nn::linear(i, o, vb);
        let a = vb.pp("attention");
        Ok(Self {
            query: lin(h, h, a.pp("self").pp("query"))?,
            key: lin(h, h, a.pp("self").pp("key"))?,
            value: lin(h, h, a.pp("self").pp("value"))?,
            attn_out: lin(h, h, a.pp("output").pp("dense"))?,
            attn_norm: Norm::new(h, cfg.layer_norm_eps, a.pp("output").pp("LayerNorm"))?,
            inter: lin(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            out: lin(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_norm: Norm::new(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let y = self.out.forward(&self.inter.forward(&x)?.gelu_erf()?)?;
        self.out_norm.forward(&(y + x)?)
    }
}

/// BERT (HF tensor names) with masked mean pooling and the length head.
pub struct TunableBert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: Norm,
    layers: Vec<Layer>,
    w1: Linear,
    w2: Linear,
    hidden: usize,
    k: usize,
}

/// Names of the frozen embedding tables.
const FROZEN: [&str; 3] = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
];

impl TunableBert {
    /// `frozen` provides the embedding tables, `vb` everything else (`head.w1`, `head.w2`).
    pub fn new(
        cfg: &Config,
        frozen: VarBuilder<'_>,
        vb: VarBuilder<'_>,
        k: usize,
        head_hidden: usize,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let e = frozen.pp("embeddings");
        let table = |n: usize, name: &str| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(e.get((n, h), name)?, h))
        };
        Ok(Self {
            word: table(cfg.vocab_size, "word_embeddings.weight")?,
            position: table(cfg.max_position_embeddings, "position_embeddings.weight")?,
            token_type: table(cfg.type_vocab_size, "token_type_embeddings.weight")?,
            emb_norm: Norm::new(h, cfg.layer_norm_eps, vb.pp("embeddings").pp("LayerNorm"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            w1: candle_nn::linear(h, head_hidden, vb.pp("head.w1"))?,
            w2: candle_nn::linear(head_hidden, k, vb.pp("head.w2"))?,
            hidden: h,
            k,
        })
    }

    /// Encoder output `[b, t, hidden]` of token ids, types and a 0/1 mask (all `[b, t]` u32).
    pub fn encode(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?;
        let x = self
            .word
            .forward(ids)?
            .add(&self.token_type.forward(types)?)?
            .broadcast_add(&self.position.forward(&pos)?)?;
        let mut x = self.emb_norm.forward(&x)?;
        let m = ((1.0 - mask.to_dtype(DType::F32)?)? * -10_000.0)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for l in &self.layers {
            x = l.forward(&x, &m)?;
        }
        Ok(x)
    }

    /// Logits `[b, k]`: masked mean of the encoder output, then the head.
    pub fn logits(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self.encode(ids, types, mask)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = x
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?.clamp(1e-9, f32::MAX)?)?;
        Ok(self.w2.forward(&self.w1.forward(&pooled)?.relu()?)?)
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// Tokenizer of `dir/tokenizer.json`, truncating to `max_len`, padding to the longest.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| format_err(path, e))?;
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| format_err(path, e))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..Default::default()
    }));
    Ok(tok)
}

/// Token ids, types and mask of a batch of texts (`[b, t]` u32 each).
pub fn encode_batch(tok: &Tokenizer, texts: &[&str]) -> Result<(Tensor, Tensor, Tensor)> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| Error::Invalid(format!("tokenizing: {e}")))?;
    let (n, t) = (enc.len(), enc.first().map_or(0, |e| e.get_ids().len()));
    let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
        enc.iter().flat_map(|e| f(e).to_vec()).collect()
    };
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(flat(&|e| e.get_ids()), (n, t), &dev)?,
        Tensor::from_vec(flat(&|e| e.get_type_ids()), (n, t), &dev)?,
        Tensor::from_vec(flat(&|e| e.get_attention_mask()), (n, t), &dev)?,
    ))
}

fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| format_err(path, e))
}

/// A fine-tuned model ready for inference.
pub struct TunedBert {
    pub model: TunableBert,
    pub tokenizer: Tokenizer,
    pub config: Config,
    /// Present while the model is trainable (after [`fine_tune`]).
    varmap: Option<VarMap>,
    frozen: HashMap<String, Tensor>,
}

impl TunedBert {
    /// Bin probabilities (n×k, row-major) of `texts`, `batch` at a time.
    pub fn predict_proba(&self, texts: &[&str], batch: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.model.k());
        for chunk in texts.chunks(batch.max(1)) {
            let (ids, types, mask) = encode_batch(&self.tokenizer, chunk)?;
            let p = candle_nn::ops::softmax_last_dim(&self.model.logits(&ids, &types, &mask)?)?;
            out.extend(p.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Every tensor (encoder, head, frozen tables) by name.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self
            .frozen
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        if let Some(vm) = &self.varmap {
            let data = vm.data().lock().expect("varmap lock");
            v.extend(
                data.iter()
                    .map(|(n, var)| (n.clone(), var.as_tensor().clone())),
            );
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// Write the weights (`dtype` F32 or F16) with `meta` in the safetensors header.
    pub fn save(&self, path: &Path, dtype: DType, meta: HashMap<String, String>) -> Result<()> {
        save_tensors(path, &self.tensors()?, dtype, meta)
    }

    /// Load a model written by [`TunedBert::save`] (`config.json` and `tokenizer.json` given).
    pub fn load(
        weights: &Path,
        config: &Path,
        tokenizer: &Path,
        k: usize,
        head_hidden: usize,
        max_len: usize,
    ) -> Result<Self> {
        let cfg = read_config(config)?;
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)
            .map_err(|e| format_err(weights, e))?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        let model = TunableBert::new(&cfg, vb.clone(), vb, k, head_hidden)
            .map_err(|e| format_err(weights, e))?;
        let frozen = tensors.into_iter().collect();
        Ok(Self {
            model,
            tokenizer: load_tokenizer(tokenizer, max_len)?,
            config: cfg,
            varmap: None,
            frozen,
        })
    }
}

/// Write named tensors as safetensors in `dtype` (F32 or F16) with metadata, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    dtype: DType,
    meta: HashMap<String, String>,
) -> Result<()> {
    let st_dtype = match dtype {
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        other => return Err(Error::Invalid(format!("cannot save as {other:?}"))),
    };
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(dtype)?.flatten_all()?;
        let bytes: Vec<u8> = match dtype {
            DType::F16 => t
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            _ => t
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        owned.push((name.clone(), tensors_shape(tensors, name), bytes));
    }
    crate::checkpoint::write_safetensors(path, st_dtype, &owned, meta)
}

fn tensors_shape(tensors: &[(String, Tensor)], name: &str) -> Vec<usize> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.dims().to_vec())
        .unwrap_or_default()
}

/// Labelled prompts for fine-tuning.
#[derive(Debug, Clone, Copy)]
pub struct Prompts<'a> {
    pub texts: &'a [&'a str],
    /// Total output length of each prompt.
    pub target: &'a [u32],
}

/// What one optimizer step reports to a progress callback.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

/// MAE of the expectation readout of `probs` (n×k) against `target`.
pub fn expectation_mae(bins: &Bins, probs: &[f32], target: &[u32]) -> f64 {
    let k = bins.k();
    let s: f64 = probs
        .chunks_exact(k)
        .zip(target)
        .map(|(p, &t)| (bins.expectation(p) - t as f64).abs())
        .sum();
    s / target.len().max(1) as f64
}

/// The base model from `dir` (config.json, tokenizer.json, model.safetensors) with a fresh
/// head drawn from `seed`; returns it with its encoder and head variables.
pub fn from_base(
    dir: &Path,
    k: usize,
    cfg: &TuneConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(TunedBert, Vec<Var>, Vec<Var>)> {
    let config = read_config(&dir.join("config.json"))?;
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), cfg.max_len)?;
    let weights = dir.join("model.safetensors");
    let base = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| format_err(&weights, e))?;
    let frozen: HashMap<String, Tensor> = FROZEN
        .iter()
        .map(|&n| {
            let t = base
                .get(n)
                .ok_or_else(|| format_err(&weights, format!("no tensor {n}")))?;
            Ok((n.to_string(), t.to_dtype(DType::F32)?))
        })
        .collect::<Result<_>>()?;
    let varmap = VarMap::new();
    let fvb = VarBuilder::from_tensors(frozen.clone(), DType::F32, &Device::Cpu);
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = TunableBert::new(&config, fvb, vb, k, cfg.head_hidden)
        .map_err(|e| format_err(&weights, e))?;
    // Encoder weights from the file; the head from the seed (PyTorch Linear init).
    let (mut body, mut head): (Vec<Var>, Vec<Var>) = (Vec::new(), Vec::new());
    {
        let data = varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if name.starts_with("head.") {
                let fan_in = if name.ends_with(".weight") {
                    var.dims()[1]
                } else if name.starts_with("head.w1") {
                    config.hidden_size
                } else {
                    cfg.head_hidden
                };
                let bound = 1.0 / (fan_in as f32).sqrt();
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                head.push(var.clone());
            } else {
                let t = base
                    .get(name.as_str())
                    .ok_or_else(|| format_err(&weights, format!("no tensor {name}")))?;
                var.set(&t.to_dtype(DType::F32)?)?;
                body.push(var.clone());
            }
        }
    }
    Ok((
        TunedBert {
            model,
            tokenizer,
            config,
            varmap: Some(varmap),
            frozen,
        },
        body,
        head,
    ))
}

/// Fine-tune all-MiniLM-L6-v2 from `dir` (config.json, tokenizer.json, model.safetensors) with
/// the length head on `train`, keeping the epoch with the best MAE on `val`.
pub fn fine_tune(
    dir: &Path,
    train: Prompts<'_>,
    val: Prompts<'_>,
    bins: &Bins,
    cfg: &TuneConfig,
    progress: &mut dyn FnMut(Step),
) -> Result<(TunedBert, TrainReport)> {
    if train.texts.is_empty() || val.texts.is_empty() {
        return Err(Error::Invalid(
            "fine-tuning needs non-empty train and validation prompts".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (tuned, body, head) = from_base(dir, bins.k(), cfg, &mut rng)?;
    let params = |lr| ParamsAdamW {
        lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt_body = AdamW::new(body, params(cfg.lr))?;
    let mut opt_head = AdamW::new(head, params(cfg.head_lr))?;
    let steps_per_epoch = train.texts.len().div_ceil(cfg.batch.max(1));
    let total = steps_per_epoch * cfg.epochs;
    let mut order: Vec<usize> = (0..train.texts.len()).collect();
    let mut best: Option<(f64, usize, HashMap<String, Tensor>)> = None;
    let mut curve = Vec::new();
    let (mut step, mut train_secs) = (0usize, 0f64);
    for e in 0..cfg.epochs {
        let t0 = Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for chunk in order.chunks(cfg.batch.max(1)) {
            let frac = 1.0 - step as f64 / total as f64;
            opt_body.set_learning_rate(cfg.lr * frac);
            opt_head.set_learning_rate(cfg.head_lr * frac);
            let texts: Vec<&str> = chunk.iter().map(|&i| train.texts[i]).collect();
            let labels: Vec<u32> = chunk
                .iter()
                .map(|&i| bins.label_at(train.target[i], bins.max()))
                .collect();
            let (ids, types, mask) = encode_batch(&tuned.tokenizer, &texts)?;
            let logits = tuned.model.logits(&ids, &types, &mask)?;
            let y = Tensor::from_vec(labels, chunk.len(), &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            opt_body.step(&grads)?;
            opt_head.step(&grads)?;
            let l = loss.to_scalar::<f32>()? as f64;
            loss_sum += l * chunk.len() as f64;
            step += 1;
            progress(Step {
                epoch: e + 1,
                step,
                steps: total,
                loss: l,
            });
        }
        train_secs += t0.elapsed().as_secs_f64();
        let probs = tuned.predict_proba(val.texts, 32)?;
        let val_mae = expectation_mae(bins, &probs, val.target);
        let (val_loss, val_acc) = loss_and_accuracy(bins, &probs, val.target);
        curve.push(EpochRecord {
            epoch: e + 1,
            train_loss: loss_sum / train.texts.len() as f64,
            val_loss,
            val_mae,
            val_accuracy: val_acc,
            lr: cfg.lr * (1.0 - (e * steps_per_epoch) as f64 / total as f64),
            seconds: t0.elapsed().as_secs_f64(),
        });
        if best.as_ref().is_none_or(|b| val_mae < b.0) {
            let snap = tuned
                .varmap
                .as_ref()
                .expect("trainable")
                .data()
                .lock()
                .expect("varmap lock")
                .iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?;
            best = Some((val_mae, e + 1, snap));
        }
    }
    let (best_val_mae, best_epoch, snap) = best.expect("at least one epoch");
    {
        let data = tuned
            .varmap
            .as_ref()
            .expect("trainable")
            .data()
            .lock()
            .expect("varmap lock");
        for (n, v) in data.iter() {
            v.set(&snap[n])?;
        }
    }
    Ok((
        tuned,
        TrainReport {
            curve,
            best_epoch,
            best_val_mae,
            train_rows_per_s: (steps_per_epoch * cfg.epochs * cfg.batch) as f64
                / train_secs.max(1e-9),
        },
    ))
}

/// Cross-entropy and argmax accuracy of probabilities against length bins (a total that
/// reaches the bins' `max` is the cap class where the bins have one).
pub fn loss_and_accuracy(bins: &Bins, probs: &[f32], target: &[u32]) -> (f64, f64) {
    let k = bins.k();
    let (mut loss, mut hits) = (0f64, 0usize);
    for (p, &t) in probs.chunks_exact(k).zip(target) {
        let label = bins.label_at(t, bins.max()) as usize;
        loss -= (p[label].max(1e-12) as f64).ln();
        let arg = p
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0;
        hits += (arg == label) as usize;
    }
    let n = target.len().max(1) as f64;
    (loss / n, hits as f64 / n)
}
