//! Serves 20 chat requests under a KV budget for about three at a time and checks each greedy
//! output equals the bare runner's; prints preemptions and step figures.
//! `cargo run -p trail-serving-shim --example engine_check -- <model.gguf> [policy]`

use std::sync::Arc;
use std::time::Instant;

use trail_llm::{GenerateOptions, Runner};
use trail_serving_shim::{Engine, EngineConfig, GenRequest, PolicyKind};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runner = Arc::new(Runner::load(args[1].as_ref()).expect("load"));
    let policy: PolicyKind = args.get(2).map_or("fcfs", String::as_str).parse().unwrap();
    let qs: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "Question {i}: name {} things that are {}.",
                i % 5 + 1,
                ["red", "round", "fast", "old", "cold"][i % 5]
            )
        })
        .collect();
    let max_new = 24;
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..GenerateOptions::default()
    };
    let t = Instant::now();
    let refs: Vec<(Vec<u32>, Vec<u32>)> = qs
        .iter()
        .map(|q| {
            let p = runner.encode_chat(q).unwrap();
            let g = runner.generate(&p, &opts, |_| {}).unwrap();
            (p, g.tokens)
        })
        .collect();
    let alone = t.elapsed().as_secs_f64();
    let longest = refs.iter().map(|(p, _)| p.len()).max().unwrap();
    let mut cfg = EngineConfig::new(3 * (longest + max_new), policy);
    cfg.scheduler.max_running = 8;
    cfg.scheduler.prefill_chunk = Some(32);
    let engine = Engine::start(runner.clone(), None, cfg).unwrap();
    let t = Instant::now();
    let hs: Vec<_> = refs
        .iter()
        .map(|(p, r)| {
            let mut req = GenRequest::greedy(p.clone(), max_new);
            req.eval_stop = Some(r.len());
            engine.submit_blocking(req).unwrap()
        })
        .collect();
    let sums: Vec<_> = hs.into_iter().map(|h| h.wait().unwrap()).collect();
    let served = t.elapsed().as_secs_f64();
    let mut equal = 0;
    for (s, (_, r)) in sums.iter().zip(&refs) {
        if &s.tokens == r {
            equal += 1;
        } else {
            println!(
                "MISMATCH {}: {:?} vs {:?}",
                s.id,
                runner.decode(&s.tokens),
                runner.decode(r)
            );
        }
    }
    let rep = engine.shutdown().unwrap();
    let c = rep.stats.counters;
    let toks: usize = sums.iter().map(|s| s.tokens.len()).sum();
    println!(
        "{policy}: {equal}/20 equal to alone; budget {} tokens; {} steps; preemptions policy {} memory {}; recomputed {} tokens; {toks} tokens in {served:.2} s served ({:.1} tok/s) vs {alone:.2} s one by one",
        3 * (longest + max_new),
        c.steps,
        c.preemptions_policy,
        c.preemptions_memory,
        c.recomputed_tokens,
        toks as f64 / served
    );
}
