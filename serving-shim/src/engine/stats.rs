//! The engine's statistics ([`EngineStats`]) from what it sees: a finished request's latencies
//! and prediction errors, and the scheduler's gauges and counters.

use crate::metrics::EngineStats;
use crate::request::Summary;
use crate::scheduler::Scheduler;

/// The gauges and counters of `st` from the scheduler's state now.
pub(super) fn set_gauges(st: &mut EngineStats, sched: &Scheduler) {
    st.waiting = sched.num_waiting();
    st.running = sched.num_running();
    st.kv_blocks_used = sched.blocks().used_blocks();
    st.counters = sched.counters();
}

/// Adds a request that finished in a step to the latency histograms and the predictor's
/// error: each estimate against the request's true length.
pub(super) fn score(st: &mut EngineStats, s: &Summary) {
    st.observe_request(s.finish, s.prompt_tokens, &s.times);
    let len = s.tokens.len() as f64;
    if let Some(p) = s.initial_prediction {
        st.initial_error.observe((p - len).abs());
    }
    for &(g, p) in &s.predictions {
        st.refined_error.observe((p - (len - f64::from(g))).abs());
    }
}
