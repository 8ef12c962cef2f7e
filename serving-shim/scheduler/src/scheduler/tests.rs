//! Scheduler unit tests with model-free sequences.

use std::sync::Arc;

use super::driver::{Driver, exact, none};
use super::*;
use crate::clock::ManualClock;
use crate::policy::{Fcfs, Oracle, PolicyKind, SjfBert, Sprpt, Trail};

fn cfg(budget: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running,
        ..SchedulerConfig::new(budget)
    }
}

/// Requests `(id, prompt_len, out_len, initial prediction)` arriving at `id` seconds... all
/// present before the first step.
fn load(d: &mut Driver, reqs: &[(SeqId, usize, usize, Option<f64>)]) {
    for &(id, prompt, out, pred) in reqs {
        let mut s = Sequence::new(id, prompt, out, id as f64).with_eval_stop(out);
        s.initial_prediction = pred;
        d.add(s, out);
    }
}

#[test]
fn fcfs_serves_in_arrival_order_one_at_a_time() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(Fcfs));
    // Arrival order 1, 2, 3 even though 3 is shortest.
    load(&mut d, &[(2, 4, 5, None), (1, 4, 9, None), (3, 4, 1, None)]);
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![1, 2, 3]);
    assert_eq!(d.s.counters().preemptions_policy, 0);
}

#[test]
fn sjf_bert_admits_by_initial_prediction() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(SjfBert)).with_predict(exact);
    load(
        &mut d,
        &[
            (1, 4, 9, Some(30.0)),
            (2, 4, 5, Some(10.0)),
            (3, 4, 2, Some(20.0)),
        ],
    );
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![2, 3, 1]);
}

#[test]
fn sjf_bert_never_preempts_running() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(SjfBert));
    load(&mut d, &[(1, 4, 20, Some(100.0))]);
    d.step();
    d.step();
    load(&mut d, &[(2, 4, 2, Some(1.0))]);
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![1, 2]);
    assert_eq!(d.s.counters().preemptions_policy, 0);
}

#[test]
fn predictive_policies_without_predictions_fall_back_to_fcfs() {
    for kind in [PolicyKind::SjfBert, PolicyKind::Sprpt, PolicyKind::Trail] {
        let mut d = Driver::new(cfg(4096, 1), kind.build(0.8));
        load(&mut d, &[(3, 4, 2, None), (1, 4, 6, None), (2, 4, 4, None)]);
        d.run_to_idle(100);
        assert_eq!(d.finish_order(), vec![1, 2, 3], "{kind}");
    }
}

#[test]
fn sprpt_preempts_a_longer_running_request() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(Sprpt)).with_predict(exact);
    load(&mut d, &[(1, 4, 40, Some(40.0))]);
    for _ in 0..5 {
        d.step();
    }
    load(&mut d, &[(2, 4, 3, Some(3.0))]);
    let plan = d.step();
    assert_eq!(plan.preempted, vec![(1, PreemptKind::Policy)]);
    assert_eq!(
        plan.prefill,
        vec![Chunk {
            id: 2,
            start: 0,
            len: 4
        }]
    );
    d.run_to_idle(200);
    assert_eq!(d.finish_order(), vec![2, 1]);
    let long = &d.done[1];
    assert_eq!(long.preemptions_policy, 1);
    assert_eq!(
        long.generated.len(),
        40,
        "generated tokens kept across preemption"
    );
    // 4 prompt + 5 generated tokens had KV when it was preempted (the 5th not yet fed).
    assert_eq!(long.recomputed_tokens, 4 + 4);
}

/// SPRPT, one running slot: request 1 (`prompt` tokens, 40 out) runs `steps` steps, then request
/// 2 (4 prompt tokens, 1 out) arrives. Returns the driver after the step where 2 preempts 1 and
/// finishes in its prefill, with that step's plan.
fn long_preempted_by_short(c: SchedulerConfig, prompt: usize, steps: usize) -> (Driver, StepPlan) {
    let mut d = Driver::new(c, Box::new(Sprpt)).with_predict(exact);
    load(&mut d, &[(1, prompt, 40, Some(40.0))]);
    for _ in 0..steps {
        d.step();
    }
    load(&mut d, &[(2, 4, 1, Some(1.0))]);
    let plan = d.step();
    assert_eq!(plan.preempted, vec![(1, PreemptKind::Policy)]);
    assert_eq!(d.finish_order(), vec![2]);
    (d, plan)
}

#[test]
fn readmission_prefills_prompt_and_generated() {
    let (mut d, _) = long_preempted_by_short(cfg(4096, 1), 6, 4);
    let plan = d.step();
    // 6 prompt + 4 generated tokens.
    assert_eq!(
        plan.prefill,
        vec![Chunk {
            id: 1,
            start: 0,
            len: 10
        }]
    );
}

fn swap_cfg(budget: usize, max_running: usize, swap: usize) -> SchedulerConfig {
    SchedulerConfig {
        preemption_mode: PreemptionMode::Swap,
        swap_budget_tokens: swap,
        ..cfg(budget, max_running)
    }
}

#[test]
fn swap_readmission_resumes_with_a_decode() {
    let (mut d, plan) = long_preempted_by_short(swap_cfg(4096, 1, 4096), 6, 4);
    assert_eq!(plan.swapped_out, vec![1]);
    assert_eq!((plan.swapped_out_tokens, plan.swapped_in_tokens), (9, 0));
    let swapped = d.s.get(1).unwrap();
    // 6 prompt + 3 fed generated tokens stay in the (swapped) cache.
    assert_eq!(swapped.computed, 9);
    assert_eq!(d.s.swap().unwrap().blocks_of(1), 1);
    assert_eq!(d.s.blocks().blocks_of(1), 0);
    // Back in: its newest token is decoded, nothing is prefilled again; its 9 tokens come
    // back from the swap pool.
    let plan = d.step();
    assert_eq!(plan.decode, vec![1]);
    assert!(plan.prefill.is_empty());
    assert_eq!((plan.swapped_out_tokens, plan.swapped_in_tokens), (0, 9));
    assert_eq!(d.s.step_shape(&plan).swapped_tokens, 9);
    assert_eq!(d.s.swap().unwrap().used_blocks(), 0);
    d.run_to_idle(200);
    let long = &d.done[1];
    assert_eq!(long.generated.len(), 40);
    assert_eq!(long.recomputed_tokens, 0);
    let c = d.s.counters();
    assert_eq!((c.swaps, c.swapped_tokens, c.recomputed_tokens), (1, 9, 0));
    // Every context token was prefilled or decoded exactly once.
    assert_eq!(c.prefill_tokens, 6 + 4);
}

#[test]
fn swap_falls_back_to_recompute_when_the_swap_pool_is_full() {
    // A swap pool of one block of 16 tokens cannot hold 20 prompt + 5 generated.
    let (mut d, plan) = long_preempted_by_short(swap_cfg(4096, 1, 16), 20, 6);
    assert!(plan.swapped_out.is_empty());
    assert_eq!(plan.swapped_tokens(), 0);
    assert_eq!(d.s.get(1).unwrap().computed, 0);
    let plan = d.step();
    assert_eq!(plan.swapped_tokens(), 0);
    assert_eq!(
        plan.prefill,
        vec![Chunk {
            id: 1,
            start: 0,
            len: 26
        }]
    );
    d.run_to_idle(200);
    assert_eq!(d.s.counters().swaps, 0);
    assert_eq!(d.done[1].recomputed_tokens, 25);
}

#[test]
fn swapped_request_mid_prefill_resumes_its_prefill() {
    // Chunks of 16: request 1 (prompt 20) is preempted after one chunk and resumes at 16.
    let c = SchedulerConfig {
        prefill_chunk: Some(16),
        ..swap_cfg(4096, 1, 4096)
    };
    let mut d = Driver::new(c, Box::new(Sprpt)).with_predict(exact);
    load(&mut d, &[(1, 20, 30, Some(30.0))]);
    d.step();
    load(&mut d, &[(2, 4, 1, Some(1.0))]);
    let plan = d.step();
    assert_eq!(plan.swapped_out, vec![1]);
    let plan = d.step();
    assert_eq!(
        plan.prefill,
        vec![Chunk {
            id: 1,
            start: 16,
            len: 4
        }]
    );
    d.run_to_idle(200);
    assert_eq!(d.done.len(), 2);
}

#[test]
fn memory_preemption_swaps_and_abort_frees_the_swap() {
    let c = SchedulerConfig {
        block_size: 4,
        ..swap_cfg(16, 8, 64)
    };
    let mut d = Driver::new(c, Box::new(Fcfs));
    load(&mut d, &[(1, 4, 8, None), (2, 4, 8, None)]);
    let mut swapped = Vec::new();
    while d.s.counters().swaps == 0 {
        swapped.extend(d.step().swapped_out);
    }
    assert_eq!(swapped, vec![2]);
    assert!(d.s.swap().unwrap().blocks_of(2) > 0);
    assert!(d.s.abort(2).is_some());
    assert_eq!(d.s.swap().unwrap().used_blocks(), 0);
    d.s.check_invariants().unwrap();
    d.run_to_idle(200);
    assert_eq!(d.finish_order(), vec![1]);
}

#[test]
fn preemption_mode_names_round_trip() {
    for m in [PreemptionMode::Recompute, PreemptionMode::Swap] {
        assert_eq!(m.as_str().parse::<PreemptionMode>().unwrap(), m);
    }
    assert!("keep".parse::<PreemptionMode>().is_err());
}

#[test]
fn trail_never_preempts_past_c_times_initial() {
    // c = 0.5 of an initial prediction of 10: preemptible while generated ≤ 5.
    let mut d = Driver::new(cfg(4096, 1), Box::new(Trail { c: 0.5 }));
    load(&mut d, &[(1, 4, 30, Some(10.0))]);
    for _ in 0..6 {
        d.step(); // 6 tokens: past the limit
    }
    assert_eq!(d.s.get(1).unwrap().generated.len(), 6);
    load(&mut d, &[(2, 4, 2, Some(1.0))]);
    d.run_to_idle(200);
    assert_eq!(d.finish_order(), vec![1, 2]);
    assert_eq!(d.s.counters().preemptions_policy, 0);

    // The same at 5 tokens (= c × initial): still preemptible.
    let mut d = Driver::new(cfg(4096, 1), Box::new(Trail { c: 0.5 }));
    load(&mut d, &[(1, 4, 30, Some(10.0))]);
    for _ in 0..5 {
        d.step();
    }
    load(&mut d, &[(2, 4, 2, Some(1.0))]);
    let plan = d.step();
    assert_eq!(plan.preempted, vec![(1, PreemptKind::Policy)]);
}

#[test]
fn trail_initial_prediction_is_the_first_one_received() {
    // No BERT: the first prediction (at prefill) becomes the initial one, as a total: the token
    // it came with plus the 10 predicted to remain; refinements do not move the limit.
    let mut d = Driver::new(cfg(4096, 1), Box::new(Trail { c: 0.8 })).with_predict(|seq, _| {
        Some(if seq.generated.is_empty() {
            10.0
        } else {
            100.0
        })
    });
    load(&mut d, &[(1, 4, 30, None)]);
    d.step();
    let s = d.s.get(1).unwrap();
    assert_eq!(s.initial_prediction, Some(11.0));
    for _ in 0..8 {
        d.step();
    }
    let s = d.s.get(1).unwrap();
    assert_eq!(s.initial_prediction, Some(11.0));
    assert_eq!(s.predicted_remaining, Some(100.0));
    assert_eq!(s.generated.len(), 9);
    assert!(!Trail { c: 0.8 }.preemptible(s), "9 > 0.8 × 11");
}

#[test]
fn oracle_runs_shortest_true_remaining_first() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(Oracle));
    load(
        &mut d,
        &[(1, 4, 12, None), (2, 4, 3, None), (3, 4, 7, None)],
    );
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![2, 3, 1]);
}

#[test]
fn memory_preemption_evicts_the_least_urgent_whatever_the_policy() {
    // 4 blocks of 4 tokens; FCFS never preempts by policy, but memory preemption still happens.
    let c = SchedulerConfig {
        block_size: 4,
        ..cfg(16, 8)
    };
    let mut d = Driver::new(c, Box::new(Fcfs));
    load(&mut d, &[(1, 4, 8, None), (2, 4, 8, None)]);
    let mut kinds = Vec::new();
    for _ in 0..200 {
        if d.s.is_idle() {
            break;
        }
        kinds.extend(d.step().preempted);
    }
    assert!(d.s.is_idle());
    assert!(!kinds.is_empty(), "the pool is too small for both");
    assert!(
        kinds
            .iter()
            .all(|&(id, k)| id == 2 && k == PreemptKind::Memory)
    );
    assert_eq!(d.finish_order(), vec![1, 2]);
    assert_eq!(d.s.counters().preemptions_policy, 0);
}

#[test]
fn trail_memory_victim_is_the_least_urgent_preemptible_or_not() {
    // Both past their limit (non-preemptible, rank −∞): memory preemption still picks one.
    let c = SchedulerConfig {
        block_size: 4,
        ..cfg(16, 8)
    };
    let mut d = Driver::new(c, Box::new(Trail { c: 0.1 }));
    load(&mut d, &[(1, 4, 8, Some(2.0)), (2, 4, 8, Some(2.0))]);
    let n = d.run_to_idle(200);
    assert!(n > 0);
    assert!(d.s.counters().preemptions_memory > 0);
    assert_eq!(d.s.counters().preemptions_policy, 0);
    assert_eq!(d.done.len(), 2);
}

#[test]
fn chunked_prefill_splits_long_prompts_and_keeps_decodes_going() {
    let c = SchedulerConfig {
        prefill_chunk: Some(8),
        ..cfg(4096, 8)
    };
    let mut d = Driver::new(c, Box::new(Fcfs));
    load(&mut d, &[(1, 4, 50, None)]);
    d.step(); // prefill of 1
    load(&mut d, &[(2, 20, 5, None)]);
    let p = d.step();
    assert_eq!(p.decode, vec![1]);
    assert_eq!(
        p.prefill,
        vec![Chunk {
            id: 2,
            start: 0,
            len: 8
        }]
    );
    let p = d.step();
    assert_eq!(p.decode, vec![1]);
    assert_eq!(
        p.prefill,
        vec![Chunk {
            id: 2,
            start: 8,
            len: 8
        }]
    );
    let p = d.step();
    assert_eq!(
        p.prefill,
        vec![Chunk {
            id: 2,
            start: 16,
            len: 4
        }]
    );
    assert_eq!(
        d.s.get(2).unwrap().generated.len(),
        1,
        "token after the last chunk"
    );
    let p = d.step();
    assert_eq!(p.decode.len(), 2);
    assert!(p.prefill.is_empty());
}

#[test]
fn max_running_is_respected() {
    let mut d = Driver::new(cfg(4096, 3), Box::new(Fcfs));
    load(
        &mut d,
        &[
            (1, 4, 5, None),
            (2, 4, 5, None),
            (3, 4, 5, None),
            (4, 4, 5, None),
            (5, 4, 5, None),
        ],
    );
    let p = d.step();
    assert_eq!(p.prefill.len(), 3);
    assert_eq!(d.s.num_running(), 3);
    assert_eq!(d.s.num_waiting(), 2);
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn abort_frees_blocks_at_any_time() {
    let mut d = Driver::new(cfg(4096, 4), Box::new(Fcfs));
    load(&mut d, &[(1, 40, 50, None), (2, 4, 50, None)]);
    d.step();
    assert!(d.s.blocks().used_blocks() > 0);
    let s = d.s.abort(1).unwrap();
    assert_eq!(s.state, SeqState::Finished(FinishReason::Aborted));
    assert_eq!(d.s.blocks().blocks_of(1), 0);
    d.s.check_invariants().unwrap();
    // Abort between schedule and on_step_done: its result is ignored.
    let plan = d.s.schedule().unwrap();
    assert_eq!(plan.decode, vec![2]);
    d.s.abort(2).unwrap();
    d.s.on_step_done(&[StepResult::token(2, 7)]).unwrap();
    assert!(d.s.is_idle());
    assert_eq!(d.s.blocks().used_blocks(), 0);
    assert!(d.s.abort(2).is_none());
    assert_eq!(d.s.counters().aborted, 2);
}

#[test]
fn an_abandoned_step_leaves_its_requests_to_abort_and_the_rest_running() {
    let mut d = Driver::new(cfg(4096, 4), Box::new(Fcfs));
    load(&mut d, &[(1, 40, 50, None), (2, 4, 50, None)]);
    d.step();
    d.s.schedule().unwrap();
    let mut planned = d.s.abandon_step();
    planned.sort_unstable();
    assert_eq!(planned, vec![1, 2]);
    assert!(
        d.s.abandon_step().is_empty(),
        "nothing is in flight any more"
    );
    d.s.abort(1).unwrap();
    d.s.check_invariants().unwrap();
    // The survivor is planned afresh and runs to its end.
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![2]);
    assert_eq!(d.s.blocks().used_blocks(), 0);
}

#[test]
fn a_max_new_tokens_near_usize_max_is_too_long_not_wrapped() {
    let mut s =
        Scheduler::new(cfg(4096, 4), Box::new(Fcfs), Arc::new(ManualClock::at(0.0))).unwrap();
    let err = s
        .add(Sequence::new(1, 10, usize::MAX - 5, 0.0))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SchedulerError::TooLong {
                tokens: usize::MAX,
                ..
            }
        ),
        "{err}"
    );
    assert!(s.is_idle());
}

#[test]
fn add_refuses_overload_oversize_and_duplicates() {
    let c = SchedulerConfig {
        max_waiting: 2,
        ..cfg(64, 4)
    };
    let mut s = Scheduler::new(c, Box::new(Fcfs), Arc::new(ManualClock::at(0.0))).unwrap();
    assert_eq!(
        s.add(Sequence::new(1, 60, 5, 0.0)),
        Err(SchedulerError::TooLong {
            tokens: 65,
            budget: 64
        })
    );
    assert_eq!(
        s.add(Sequence::new(1, 0, 5, 0.0)),
        Err(SchedulerError::EmptyPrompt(1))
    );
    assert_eq!(
        s.add(Sequence::new(1, 4, 0, 0.0)),
        Err(SchedulerError::NoNewTokens(1))
    );
    s.add(Sequence::new(1, 4, 4, 0.0)).unwrap();
    assert_eq!(
        s.add(Sequence::new(1, 4, 4, 0.0)),
        Err(SchedulerError::DuplicateId(1))
    );
    s.add(Sequence::new(2, 4, 4, 0.0)).unwrap();
    assert_eq!(
        s.add(Sequence::new(3, 4, 4, 0.0)),
        Err(SchedulerError::Overloaded { max_waiting: 2 })
    );
}

#[test]
fn step_results_are_checked() {
    let mut s =
        Scheduler::new(cfg(4096, 4), Box::new(Fcfs), Arc::new(ManualClock::at(0.0))).unwrap();
    assert_eq!(s.on_step_done(&[]), Err(SchedulerError::NoStepInFlight));
    s.add(Sequence::new(1, 4, 4, 0.0)).unwrap();
    s.add(Sequence::new(2, 4, 4, 0.0)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(plan.prefill.len(), 2);
    assert_eq!(s.schedule(), Err(SchedulerError::StepInFlight));
    assert_eq!(
        s.on_step_done(&[StepResult::token(1, 0)]),
        Err(SchedulerError::MissingToken(2))
    );
    s.on_step_done(&[StepResult::token(1, 0), StepResult::token(2, 0)])
        .unwrap();
    assert_eq!(s.get(1).unwrap().generated, vec![0]);
}

#[test]
fn timestamps_and_counters() {
    let mut d = Driver::new(cfg(4096, 4), Box::new(Fcfs)).with_predict(none);
    load(&mut d, &[(1, 4, 3, None)]);
    d.clock.advance(1.0);
    d.run_to_idle(10);
    let s = &d.done[0];
    assert_eq!(s.times.arrival, 1.0);
    assert_eq!(s.times.first_scheduled, Some(1.0));
    assert_eq!(s.times.first_token, Some(1.01));
    assert_eq!(s.times.tokens.len(), 3);
    assert!(s.times.finish.unwrap() > 1.02);
    assert_eq!(s.state, SeqState::Finished(FinishReason::Stop));
    let c = d.s.counters();
    assert_eq!(
        (c.added, c.admitted, c.finished, c.generated_tokens),
        (1, 1, 1, 3)
    );
    assert_eq!(c.prefill_tokens, 4);
}

#[test]
fn length_limit_finishes_with_length() {
    let mut d = Driver::new(cfg(4096, 4), Box::new(Fcfs));
    d.add(Sequence::new(1, 4, 3, 0.0), 100);
    d.run_to_idle(10);
    assert_eq!(d.done[0].state, SeqState::Finished(FinishReason::Length));
    assert_eq!(d.done[0].generated.len(), 3);
}

#[test]
fn aging_lets_a_long_waiting_request_go_first() {
    // SJF-BERT with a stream of short requests: without aging the long one waits for all of
    // them; with aging it is admitted once its wait outweighs its predicted length.
    let run = |aging: f64| {
        let c = SchedulerConfig {
            aging,
            ..cfg(4096, 1)
        };
        let mut d = Driver::new(c, Box::new(SjfBert));
        d.dt = 1.0;
        load(&mut d, &[(1, 4, 2, Some(100.0))]);
        let mut next = 2;
        for _ in 0..60 {
            if d.s.num_waiting() < 3 {
                d.add(
                    Sequence::new(next, 4, 8, d.clock.now()).with_initial_prediction(2.0),
                    2,
                );
                next += 1;
            }
            d.step();
        }
        d.done.iter().position(|s| s.id == 1)
    };
    assert_eq!(run(0.0), None, "starves without aging");
    assert!(run(10.0).is_some_and(|p| p < 10), "{:?}", run(10.0));
}

#[test]
fn one_prompt_token_left_by_a_chunk_is_a_prefill_not_a_decode() {
    let c = SchedulerConfig {
        prefill_chunk: Some(8),
        ..cfg(4096, 4)
    };
    let mut d = Driver::new(c, Box::new(Fcfs));
    load(&mut d, &[(1, 9, 3, None)]);
    assert_eq!(
        d.step().prefill,
        vec![Chunk {
            id: 1,
            start: 0,
            len: 8
        }]
    );
    let p = d.step();
    assert!(p.decode.is_empty());
    assert_eq!(
        p.prefill,
        vec![Chunk {
            id: 1,
            start: 8,
            len: 1
        }]
    );
    assert_eq!(d.step().decode, vec![1]);
}

#[test]
fn the_waiting_queue_lists_admission_order_and_forgets_aborted_requests() {
    let mut d = Driver::new(cfg(4096, 1), Box::new(SjfBert));
    load(
        &mut d,
        &[
            (1, 4, 9, Some(30.0)),
            (2, 4, 5, Some(10.0)),
            (3, 4, 2, Some(20.0)),
            (4, 4, 2, Some(10.0)),
        ],
    );
    // Ties (2 and 4) go to the earlier arrival.
    assert_eq!(d.s.waiting_ids().collect::<Vec<_>>(), vec![2, 4, 3, 1]);
    assert!(d.s.abort(4).is_some());
    assert_eq!(d.s.waiting_ids().collect::<Vec<_>>(), vec![2, 3, 1]);
    d.s.check_invariants().unwrap();
    d.run_to_idle(100);
    assert_eq!(d.finish_order(), vec![2, 3, 1]);
}
