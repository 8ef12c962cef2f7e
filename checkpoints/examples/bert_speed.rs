//! Embedding throughput of the frozen BERT baseline (all-MiniLM-L6-v2) on this machine.
//!
//! `cargo run -p trail-checkpoints --example bert_speed -- [texts] [batch] [words]`
//! (defaults: 256 texts, batch 32, 40 words per text).

use trail_checkpoints::bert::BertEncoder;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, batch, words) = (
        args.first().copied().unwrap_or(256),
        args.get(1).copied().unwrap_or(32),
        args.get(2).copied().unwrap_or(40),
    );
    let dir = std::path::PathBuf::from(std::env::var("HOME").expect("HOME"))
        .join(".cache/trail/bert/all-MiniLM-L6-v2");
    let enc = BertEncoder::load(&dir, 256).expect("loading all-MiniLM-L6-v2");
    let vocab = [
        "write", "a", "short", "poem", "about", "the", "sea", "explain", "how", "rust", "borrow",
        "checker", "works",
    ];
    let texts: Vec<String> = (0..n)
        .map(|i| {
            (0..words)
                .map(|j| vocab[(i * 7 + j * 3) % vocab.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let e = enc.embed_batched(&refs, batch).expect("embedding");
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{n} texts × ~{words} words, batch {batch}: {:.1} texts/s ({} values)",
        n as f64 / s,
        e.len()
    );
}
