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

/// Adds a finished request to the latency histograms and the online predictor MAE.
pub(super) fn score(st: &mut EngineStats, s: &Summary) {
    let t = &s.times;
    if let Some(ft) = t.first_token {
        st.ttft.observe(ft - t.arrival);
    }
    if let Some(f) = t.finish {
        st.latency.observe(f - t.arrival);
    }
    let len = s.tokens.len() as f64;
    if let Some(p) = s.initial_prediction {
        st.initial_abs_err += (p - len).abs();
        st.initial_count += 1;
    }
    for &(g, p) in &s.predictions {
        st.refined_abs_err += (p - (len - f64::from(g))).abs();
        st.refined_count += 1;
    }
}
