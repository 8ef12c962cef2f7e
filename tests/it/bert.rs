//! The BERT baselines on the real all-MiniLM-L6-v2 (fetched into the trail cache on first use,
//! `$TRAIL_HOME` honoured): the frozen encoder's pooled embeddings, the fine-tuned model's own
//! forward against candle-transformers' `BertModel`, and one epoch of fine-tuning.

use candle_core::DType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trail_checkpoints::Bins;
use trail_checkpoints::bert::BertEncoder;
use trail_checkpoints::bert_tune::{Prompts, TuneConfig, encode_batch, fine_tune, from_base};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The frozen encoder's rows are unit-norm masked means: padding does not leak into a short
/// text's row, and paraphrases are closer than unrelated text.
#[test]
fn minilm_embeddings_are_normalized_masked_means() {
    let enc = BertEncoder::load(&trail_tests::minilm_dir(), 256).unwrap();
    assert_eq!(enc.hidden(), 384);
    let texts = [
        "How do I bake a loaf of bread at home?",
        "Give me a simple recipe for homemade bread.",
        "The stock market fell sharply today after the central bank raised rates again.",
    ];
    let all = enc.embed(&texts).unwrap();
    let rows: Vec<&[f32]> = all.chunks_exact(384).collect();
    for r in &rows {
        assert!((dot(r, r) - 1.0).abs() < 1e-5);
    }
    let alone = enc.embed(&texts[..1]).unwrap();
    let diff = max_diff(&alone, rows[0]);
    assert!(diff < 1e-4, "max diff {diff}");
    let (same, other) = (dot(rows[0], rows[1]), dot(rows[0], rows[2]));
    assert!(same > other + 0.2, "paraphrase {same}, unrelated {other}");
}

/// The differentiable BERT forward of the fine-tuned baseline equals candle-transformers'
/// `BertModel` (through the frozen encoder's pooled, normalized output) on the base weights.
#[test]
fn tunable_bert_matches_candle_bert() {
    let dir = trail_tests::minilm_dir();
    let texts = [
        "How do I bake bread?",
        "Write a long essay about the history of Rome.",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (tuned, _, _) = from_base(&dir, 10, &TuneConfig::default(), &mut rng).unwrap();
    let (ids, types, mask) = encode_batch(&tuned.tokenizer, &texts).unwrap();
    let x = tuned.model.encode(&ids, &types, &mask).unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let mean = x
        .broadcast_mul(&m)
        .unwrap()
        .sum(1)
        .unwrap()
        .broadcast_div(&m.sum(1).unwrap())
        .unwrap();
    let norm = mean.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let ours: Vec<f32> = mean
        .broadcast_div(&norm)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let theirs = BertEncoder::load(&dir, 256).unwrap().embed(&texts).unwrap();
    let diff = max_diff(&ours, &theirs);
    assert!(diff < 1e-4, "max diff {diff}");
}

/// One epoch of fine-tuning runs end to end and the tuned model predicts a distribution per text.
#[test]
fn fine_tuning_one_epoch_runs_and_predicts() {
    let texts = [
        "How do I bake bread?",
        "Write a long essay about the history of Rome.",
    ];
    let target = [20u32, 400];
    let bins = Bins::default();
    let cfg = TuneConfig {
        epochs: 1,
        batch: 2,
        ..Default::default()
    };
    let p = Prompts {
        texts: &texts,
        target: &target,
    };
    let dir = trail_tests::minilm_dir();
    let (tuned, report) = fine_tune(&dir, p, p, &bins, &cfg, &mut |_| {}).unwrap();
    assert_eq!(report.curve.len(), 1);
    let probs = tuned.predict_proba(&texts, 2).unwrap();
    assert_eq!(probs.len(), 2 * bins.k());
    assert!(probs.iter().all(|p| p.is_finite()));
}
