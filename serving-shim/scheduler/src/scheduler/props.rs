//! Property tests over random add / step / abort sequences: blocks conserved, no request lost
//! or duplicated, limits respected, every request finishes when steps keep running.

use std::collections::HashSet;

use proptest::prelude::*;

use super::driver::Driver;
use super::*;
use crate::policy::{PolicyKind, Trail};

#[derive(Debug, Clone)]
enum Op {
    Add {
        prompt: usize,
        max_new: usize,
        out: usize,
        bert: Option<f64>,
    },
    Step,
    Abort(usize),
    Wait(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..48, 1usize..32, 1usize..40, proptest::option::of(1.0f64..64.0))
            .prop_map(|(prompt, max_new, out, bert)| Op::Add { prompt, max_new, out, bert }),
        6 => Just(Op::Step),
        1 => (0usize..64).prop_map(Op::Abort),
        1 => (1u8..20).prop_map(Op::Wait),
    ]
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        prop_oneof![Just(1usize), Just(4), Just(16)],
        16usize..400,
        1usize..8,
        proptest::option::of(1usize..40),
        prop_oneof![Just(0.0), Just(0.5), Just(20.0)],
        4usize..64,
        prop_oneof![Just(PreemptionMode::Recompute), Just(PreemptionMode::Swap)],
        0usize..400,
    )
        .prop_map(
            |(block_size, budget, max_running, prefill_chunk, aging, max_waiting, mode, swap)| {
                SchedulerConfig {
                    max_running,
                    kv_budget_tokens: budget.max(block_size),
                    block_size,
                    prefill_chunk,
                    max_waiting,
                    aging,
                    preemption_mode: mode,
                    swap_budget_tokens: swap,
                }
            },
        )
}

/// A deterministic, id-dependent misprediction: ×0.25 … ×2.5 of the true remaining length.
fn noisy(seq: &Sequence, true_len: usize) -> Option<f64> {
    let factor = 0.25 + (seq.id * 7 % 10) as f64 / 4.0;
    Some(true_len.saturating_sub(seq.generated.len() + 1) as f64 * factor)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn scheduler_invariants_hold(
        cfg in config(),
        kind in proptest::sample::select(PolicyKind::ALL.to_vec()),
        c in prop_oneof![Just(0.0), Just(0.5), Just(0.8), Just(1.0)],
        ops in proptest::collection::vec(op(), 1..160),
    ) {
        let policy: Box<dyn Policy> = match kind {
            PolicyKind::Trail => Box::new(Trail { c }),
            k => k.build(c),
        };
        let max_running = cfg.max_running;
        let mut d = Driver::new(cfg, policy).with_predict(noisy);
        let mut next_id: SeqId = 0;
        let mut added: Vec<(SeqId, usize)> = Vec::new(); // (id, expected tokens)
        let mut aborted: HashSet<SeqId> = HashSet::new();
        for op in ops {
            match op {
                Op::Add { prompt, max_new, out, bert } => {
                    let mut s = Sequence::new(next_id, prompt, max_new, d.clock.now())
                        .with_eval_stop(out.min(max_new));
                    s.initial_prediction = bert;
                    match d.s.add(s) {
                        Ok(()) => {
                            d.lens.insert(next_id, out);
                            added.push((next_id, out.min(max_new)));
                        }
                        Err(SchedulerError::TooLong { .. } | SchedulerError::Overloaded { .. }) => {}
                        Err(e) => panic!("unexpected add error {e}"),
                    }
                    next_id += 1;
                }
                Op::Step => {
                    let plan = d.step();
                    prop_assert!(plan.num_rows() <= max_running);
                    if let Some(chunk) = d.s.config().prefill_chunk {
                        prop_assert!(plan.prefill_tokens() <= chunk);
                    }
                }
                Op::Abort(i) => {
                    if let Some(&(id, _)) = added.get(i) {
                        let live = d.s.get(id).is_some();
                        prop_assert_eq!(d.s.abort(id).is_some(), live);
                        if live {
                            aborted.insert(id);
                        }
                    }
                }
                Op::Wait(ms) => d.clock.advance(f64::from(ms) / 1000.0),
            }
            let b = d.s.blocks();
            prop_assert_eq!(b.used_blocks() + b.free_blocks(), b.total_blocks());
            d.s.check_invariants().map_err(TestCaseError::fail)?;
        }
        d.run_to_idle(20_000);
        let b = d.s.blocks();
        prop_assert_eq!(b.used_blocks(), 0);
        prop_assert_eq!(b.free_blocks(), b.total_blocks());
        // Every request not aborted finished exactly once, with all its tokens.
        let mut seen = HashSet::new();
        for s in &d.done {
            prop_assert!(seen.insert(s.id), "{} finished twice", s.id);
            prop_assert!(!aborted.contains(&s.id));
        }
        for &(id, tokens) in &added {
            if aborted.contains(&id) {
                continue;
            }
            let s = d.done.iter().find(|s| s.id == id);
            prop_assert!(s.is_some(), "request {} lost", id);
            let s = s.unwrap();
            prop_assert_eq!(s.generated.len(), tokens);
            prop_assert_eq!(s.generated.clone(), (0..tokens as u32).collect::<Vec<_>>());
            prop_assert_eq!(s.times.tokens.len(), tokens);
        }
        let c = d.s.counters();
        prop_assert_eq!(c.finished as usize + aborted.len(), added.len());
        let per_seq: u64 = d.done.iter().map(|s| u64::from(s.preemptions())).sum();
        prop_assert!(per_seq <= c.preemptions_policy + c.preemptions_memory);
    }

    /// TRAIL never preempts by policy a request past c × its first prediction.
    #[test]
    fn trail_never_policy_preempts_past_the_limit(
        c in 0.1f64..1.0,
        reqs in proptest::collection::vec((1usize..16, 1usize..40, 1.0f64..40.0, 0u8..6), 2..30),
        max_running in 1usize..4,
    ) {
        let cfg = SchedulerConfig { max_running, ..SchedulerConfig::new(100_000) };
        let mut d = Driver::new(cfg, Box::new(Trail { c })).with_predict(noisy);
        let mut pending = reqs.into_iter().enumerate().collect::<Vec<_>>();
        pending.reverse();
        for _ in 0..10_000 {
            // Release requests over time: each waits `gap` steps after the previous one.
            if let Some((i, (prompt, out, bert, gap))) = pending.last().copied() {
                if d.s.counters().steps as usize % 6 >= gap as usize || d.s.is_idle() {
                    pending.pop();
                    d.add(
                        Sequence::new(i as SeqId, prompt, 64, d.clock.now())
                            .with_initial_prediction(bert),
                        out,
                    );
                }
            } else if d.s.is_idle() {
                break;
            }
            // Snapshot who is past the limit before the step.
            let past: Vec<SeqId> = d.s.running_ids().iter().copied()
                .filter(|id| {
                    let s = d.s.get(*id).unwrap();
                    s.generated.len() as f64 > c * s.initial_prediction.unwrap()
                })
                .collect();
            let plan = d.step();
            for (id, kind) in plan.preempted {
                prop_assert_eq!(kind, PreemptKind::Policy, "the pool is large");
                prop_assert!(!past.contains(&id), "{} preempted past the limit", id);
            }
        }
        prop_assert!(d.s.is_idle() && pending.is_empty());
    }
}
