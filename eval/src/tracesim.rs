//! A trace-driven serving simulator: the serving shim's [`Scheduler`] and policies, unchanged
//! (`trail-scheduler`), with the model step replaced by a [`StepTimeModel`] fitted to a step log.
//!
//! Each replica owns a `Scheduler` over its own [`ManualClock`] and is driven exactly as the
//! engine drives it: `schedule()` plans a step at time `t`, the step takes
//! [`StepTimeModel::step_secs`] seconds of its shape (the KV it swaps out and back in
//! included), the clock moves to the step's end and `on_step_done`
//! reports a token for every row that reaches the end of its context (decodes and completed
//! prefills). Requests finish at their trace's `output_tokens` (`ignore_eos`: the scheduler's
//! `Length` finish). A router sends each arrival to one replica.
//!
//! Predictions: every request starts with an initial total-length prediction (given, or the
//! true length, optionally with a seeded multiplicative log-normal error). After each token the
//! simulator reports the refined remaining prediction `max(initial − generated, 1)` as the
//! engine's predictor would; the oracle policy reads the true remaining length instead.

use std::sync::Arc;

use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;
use trail_scheduler::{ManualClock, Scheduler, SeqId, Sequence, StepPlan, StepResult};
// The scheduler's policy names and settings, and the step-time model, re-exported for callers
// of `simulate`.
pub use trail_scheduler::{PolicyKind, SchedulerConfig, StepSample, StepTimeModel};

use crate::Error;
use crate::loadgen::TraceRequest;

/// How arrivals are spread over replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Router {
    /// Replica `i mod n` for the `i`-th arrival.
    RoundRobin,
    /// The replica with the fewest live (waiting + running) requests; ties to the lowest index.
    JoinShortestQueue,
    /// The replica with the least predicted remaining output tokens over its live requests.
    LeastPredictedWork,
}

/// Multiplicative error applied to the initial predictions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum PredictionError {
    /// `prediction × exp(N(0, sigma²))`, seeded (ChaCha8).
    LogNormal { sigma: f64, seed: u64 },
}

/// Initial predictions of the requests' total output lengths.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Predictions {
    /// One per trace request; `None`: the true length (`output_tokens`).
    pub initial: Option<Vec<f64>>,
    /// Error applied on top of `initial`.
    pub error: Option<PredictionError>,
}

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Each replica's scheduler.
    pub scheduler: SchedulerConfig,
    pub policy: PolicyKind,
    /// TRAIL's preemption limit.
    pub c: f64,
    pub replicas: usize,
    pub router: Router,
    pub predictions: Predictions,
}

/// One simulated request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestResult {
    /// Index in the trace.
    pub index: usize,
    pub replica: usize,
    pub arrival: f64,
    pub first_token: f64,
    pub finish: f64,
    /// `finish − arrival`.
    pub latency: f64,
    /// `first_token − arrival`.
    pub ttft: f64,
    /// Preemptions of either kind.
    pub preemptions: u32,
}

/// What a simulation gives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimResult {
    /// In trace order.
    pub requests: Vec<RequestResult>,
    pub mean_latency: f64,
    pub p50_latency: f64,
    pub p90_latency: f64,
    pub p99_latency: f64,
    pub mean_ttft: f64,
    /// Steps run over all replicas.
    pub steps: u64,
    /// Preemptions over all requests.
    pub preemptions: u64,
    /// Time of the last finish.
    pub makespan: f64,
}

struct Replica {
    sched: Scheduler,
    clock: Arc<ManualClock>,
    /// End time and results of the step in flight.
    in_flight: Option<(f64, Vec<StepResult>)>,
    steps: u64,
}

impl Replica {
    fn live(&self) -> usize {
        self.sched.num_waiting() + self.sched.num_running()
    }

    fn predicted_work(&self) -> f64 {
        self.sched
            .waiting_ids()
            .chain(self.sched.running_ids().iter().copied())
            .filter_map(|id| self.sched.get(id))
            .map(|s| s.estimated_remaining().unwrap_or(s.max_new_tokens as f64))
            .sum()
    }

    /// Plans a step at `now` and puts it in flight.
    fn start_step(&mut self, now: f64, model: &StepTimeModel) -> Result<(), Error> {
        let plan: StepPlan = self.sched.schedule().map_err(sched_err)?;
        if plan.is_empty() {
            self.sched.on_step_done(&[]).map_err(sched_err)?;
            return Err(Error::BadParameter(format!(
                "the scheduler planned an empty step with {} requests live (a bug)",
                self.live()
            )));
        }
        let mut results = Vec::with_capacity(plan.num_rows());
        let rows = plan
            .decode
            .iter()
            .map(|&id| (id, None))
            .chain(plan.prefill.iter().map(|c| (c.id, Some((c.start, c.len)))));
        for (id, chunk) in rows {
            let s = self.sched.get(id).expect("planned sequences are live");
            let end = match chunk {
                None => s.computed + 1,
                Some((start, len)) => start + len,
            };
            if end == s.total_len() {
                let generated = s.num_generated() as f64 + 1.0;
                results.push(StepResult {
                    id,
                    token: Some(0),
                    stop: false,
                    prediction: s.initial_prediction.map(|p| (p - generated).max(1.0)),
                });
            }
        }
        let dt = model.step_secs(&self.sched.step_shape(&plan));
        self.in_flight = Some((now + dt.max(0.0), results));
        self.steps += 1;
        Ok(())
    }

    /// Ends the step in flight; `index_of[id]` is the trace index of sequence `id`.
    fn finish_step(
        &mut self,
        out: &mut [Option<RequestResult>],
        index_of: &[usize],
    ) -> Result<(), Error> {
        let (end, results) = self.in_flight.take().expect("a step is in flight");
        self.clock.set(end);
        self.sched.on_step_done(&results).map_err(sched_err)?;
        for s in self.sched.take_finished() {
            let i = index_of[s.id as usize];
            let first_token = s.times.first_token.expect("a finished request has a token");
            let finish = s.times.finish.expect("finished");
            let arrival = s.times.arrival;
            if out[i].is_some() {
                return Err(Error::BadParameter(format!("request {i} finished twice")));
            }
            out[i] = Some(RequestResult {
                index: i,
                replica: usize::MAX, // filled by the caller's routing table
                arrival,
                first_token,
                finish,
                latency: finish - arrival,
                ttft: first_token - arrival,
                preemptions: s.preemptions(),
            });
        }
        Ok(())
    }
}

fn sched_err(e: trail_scheduler::SchedulerError) -> Error {
    Error::BadParameter(format!("scheduler: {e}"))
}

/// Replays `trace` (with `prompt_lens[i]` prompt tokens for request `i`) on `cfg.replicas`
/// replicas whose steps take `model`'s time.
pub fn simulate(
    trace: &[TraceRequest],
    prompt_lens: &[usize],
    cfg: &SimConfig,
    model: &StepTimeModel,
) -> Result<SimResult, Error> {
    if trace.is_empty() {
        return Err(Error::EmptySample);
    }
    if prompt_lens.len() != trace.len() {
        return Err(Error::BadParameter(format!(
            "{} prompt lengths for {} requests",
            prompt_lens.len(),
            trace.len()
        )));
    }
    if cfg.replicas == 0 {
        return Err(Error::BadParameter("replicas must be at least 1".into()));
    }
    if !(cfg.c.is_finite() && cfg.c >= 0.0) {
        return Err(Error::BadParameter(format!("c must be ≥ 0, got {}", cfg.c)));
    }
    let out_lens: Vec<usize> = trace
        .iter()
        .enumerate()
        .map(|(i, r)| match r.output_tokens {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(Error::BadParameter(format!(
                "request {i}: the simulator needs output_tokens ≥ 1"
            ))),
        })
        .collect::<Result<_, _>>()?;
    let initial = initial_predictions(&cfg.predictions, &out_lens)?;

    let mut replicas: Vec<Replica> = (0..cfg.replicas)
        .map(|_| {
            let clock = Arc::new(ManualClock::at(0.0));
            let sched = Scheduler::new(
                cfg.scheduler.clone(),
                cfg.policy.build(cfg.c),
                clock.clone(),
            )
            .map_err(sched_err)?;
            Ok(Replica {
                sched,
                clock,
                in_flight: None,
                steps: 0,
            })
        })
        .collect::<Result<_, Error>>()?;

    // Arrival order (stable for equal times); sequence ids are positions in it.
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by(|&a, &b| trace[a].arrival_s.total_cmp(&trace[b].arrival_s));
    let mut results: Vec<Option<RequestResult>> = vec![None; trace.len()];
    let mut routed = vec![0usize; trace.len()];
    let mut next = 0;
    let mut rr = 0;
    loop {
        let t_arrival = order.get(next).map(|&i| trace[i].arrival_s);
        let t_step = replicas
            .iter()
            .filter_map(|r| r.in_flight.as_ref().map(|f| f.0))
            .min_by(f64::total_cmp);
        let now = match (t_arrival, t_step) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(s)) => s,
            (Some(a), Some(s)) => a.min(s),
        };
        // Steps ending now, then arrivals now, then new steps: as the engine drains requests
        // between steps.
        for r in replicas.iter_mut() {
            if r.in_flight.as_ref().is_some_and(|f| f.0 <= now) {
                r.finish_step(&mut results, &order)?;
            }
        }
        while let Some(&i) = order.get(next) {
            if trace[i].arrival_s > now {
                break;
            }
            let k = match cfg.router {
                Router::RoundRobin => {
                    rr += 1;
                    (rr - 1) % replicas.len()
                }
                Router::JoinShortestQueue => argmin(replicas.iter().map(|r| r.live() as f64)),
                Router::LeastPredictedWork => argmin(replicas.iter().map(Replica::predicted_work)),
            };
            routed[i] = k;
            let r = &mut replicas[k];
            r.clock.set(now);
            let mut seq = Sequence::new(next as SeqId, prompt_lens[i], out_lens[i], now)
                .with_eval_stop(out_lens[i]);
            if let Some(p) = initial[i] {
                seq = seq.with_initial_prediction(p);
            }
            r.sched
                .add(seq)
                .map_err(|e| Error::BadParameter(format!("request {i}: scheduler: {e}")))?;
            next += 1;
        }
        for r in replicas.iter_mut() {
            if r.in_flight.is_none() && !r.sched.is_idle() {
                r.clock.set(now);
                r.start_step(now, model)?;
            }
        }
    }
    summarize(results, &routed, replicas.iter().map(|r| r.steps).sum())
}

fn argmin(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::INFINITY);
    for (i, x) in xs.enumerate() {
        if x < best.1 {
            best = (i, x);
        }
    }
    best.0
}

fn initial_predictions(p: &Predictions, out_lens: &[usize]) -> Result<Vec<Option<f64>>, Error> {
    let mut base: Vec<f64> = match &p.initial {
        Some(v) if v.len() != out_lens.len() => {
            return Err(Error::BadParameter(format!(
                "{} initial predictions for {} requests",
                v.len(),
                out_lens.len()
            )));
        }
        Some(v) => v.clone(),
        None => out_lens.iter().map(|&n| n as f64).collect(),
    };
    if let Some(PredictionError::LogNormal { sigma, seed }) = p.error {
        let d = LogNormal::new(0.0, sigma)
            .map_err(|e| Error::BadParameter(format!("log-normal sigma {sigma}: {e}")))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for x in &mut base {
            *x *= d.sample(&mut rng);
        }
    }
    base.iter()
        .map(|&x| {
            if x.is_finite() && x >= 0.0 {
                Ok(Some(x))
            } else {
                Err(Error::NotFinite(format!("initial prediction {x}")))
            }
        })
        .collect()
}

/// numpy's linear quantile of sorted values (`trail_stats`); NaN when there are none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    trail_stats::quantile_sorted(sorted, q).unwrap_or(f64::NAN)
}

fn summarize(
    results: Vec<Option<RequestResult>>,
    routed: &[usize],
    steps: u64,
) -> Result<SimResult, Error> {
    let requests: Vec<RequestResult> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map(|mut r| {
                r.replica = routed[i];
                r
            })
            .ok_or_else(|| Error::BadParameter(format!("request {i} never finished")))
        })
        .collect::<Result<_, _>>()?;
    let n = requests.len() as f64;
    let mut lat: Vec<f64> = requests.iter().map(|r| r.latency).collect();
    lat.sort_by(f64::total_cmp);
    Ok(SimResult {
        mean_latency: lat.iter().sum::<f64>() / n,
        p50_latency: quantile(&lat, 0.5),
        p90_latency: quantile(&lat, 0.9),
        p99_latency: quantile(&lat, 0.99),
        mean_ttft: requests.iter().map(|r| r.ttft).sum::<f64>() / n,
        steps,
        preemptions: requests.iter().map(|r| u64::from(r.preemptions)).sum(),
        makespan: requests.iter().map(|r| r.finish).fold(0.0, f64::max),
        requests,
    })
}

/// A synthetic trace: `n` Poisson arrivals at `rate` per second, output lengths exponential with
/// mean `mean_out` rounded up and capped at `max_out`, prompt lengths uniform in `prompt`
/// (inclusive). Returns the trace and its prompt lengths; same seed, same trace.
pub fn synthetic_trace(
    n: usize,
    rate: f64,
    mean_out: f64,
    max_out: u32,
    prompt: (usize, usize),
    seed: u64,
) -> Result<(Vec<TraceRequest>, Vec<usize>), Error> {
    use rand::Rng;
    if !(mean_out.is_finite() && mean_out > 0.0)
        || max_out == 0
        || prompt.0 == 0
        || prompt.1 < prompt.0
    {
        return Err(Error::BadParameter(format!(
            "synthetic trace: mean_out {mean_out}, max_out {max_out}, prompt {prompt:?}"
        )));
    }
    let times = crate::loadgen::Arrivals::Poisson { rate }.times(n, seed)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let exp = rand_distr::Exp::new(1.0 / mean_out).expect("checked positive");
    let mut trace = Vec::with_capacity(n);
    let mut lens = Vec::with_capacity(n);
    for (i, t) in times.into_iter().enumerate() {
        let out = (exp.sample(&mut rng).ceil() as u32).clamp(1, max_out);
        let mut r = TraceRequest::new(t, String::new(), Some(out));
        r.request_id = Some(format!("r{i}"));
        trace.push(r);
        lens.push(rng.random_range(prompt.0..=prompt.1));
    }
    Ok((trace, lens))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(policy: PolicyKind, kv: usize, max_running: usize) -> SimConfig {
        let mut scheduler = SchedulerConfig::new(kv);
        scheduler.max_running = max_running;
        SimConfig {
            scheduler,
            policy,
            c: 0.8,
            replicas: 1,
            router: Router::RoundRobin,
            predictions: Predictions::default(),
        }
    }

    fn req(t: f64, out: u32) -> TraceRequest {
        TraceRequest::new(t, String::new(), Some(out))
    }

    #[test]
    fn fcfs_constant_step_matches_hand_computed_schedule() {
        // A at 0 (2 tokens), B at 0.5 (1 token), C at 5 (1 token); steps of 1 s, one running.
        // 0→1 prefill A (token 1); 1→2 decode A (done at 2); 2→3 prefill B (done at 3);
        // idle until 5; 5→6 prefill C (done at 6).
        let trace = [req(0.0, 2), req(0.5, 1), req(5.0, 1)];
        let r = simulate(
            &trace,
            &[4, 4, 4],
            &cfg(PolicyKind::Fcfs, 1024, 1),
            &StepTimeModel::constant(1.0),
        )
        .unwrap();
        let got: Vec<(f64, f64)> = r
            .requests
            .iter()
            .map(|q| (q.first_token, q.finish))
            .collect();
        assert_eq!(got, vec![(1.0, 2.0), (3.0, 3.0), (6.0, 6.0)]);
        assert_eq!(r.mean_latency, (2.0 + 2.5 + 1.0) / 3.0);
        assert_eq!(r.mean_ttft, (1.0 + 2.5 + 1.0) / 3.0);
        assert_eq!(r.steps, 4);
        // With room for both, B joins A's decode step: 1→2 decode A + prefill B.
        let r = simulate(
            &trace,
            &[4, 4, 4],
            &cfg(PolicyKind::Fcfs, 1024, 8),
            &StepTimeModel::constant(1.0),
        )
        .unwrap();
        let got: Vec<f64> = r.requests.iter().map(|q| q.finish).collect();
        assert_eq!(got, vec![2.0, 2.0, 6.0]);
        assert_eq!(r.steps, 3);
    }

    fn model() -> StepTimeModel {
        StepTimeModel::linear(0.01, 5e-4, 5e-5, 1e-7)
    }

    #[test]
    fn every_request_finishes_once_under_every_policy() {
        let (trace, lens) = synthetic_trace(2000, 20.0, 60.0, 512, (8, 128), 1).unwrap();
        for policy in PolicyKind::ALL {
            for router in [Router::RoundRobin, Router::LeastPredictedWork] {
                let mut c = cfg(policy, 4096, 16);
                c.replicas = 2;
                c.router = router;
                c.predictions.error = Some(PredictionError::LogNormal {
                    sigma: 0.5,
                    seed: 3,
                });
                let r = simulate(&trace, &lens, &c, &model()).unwrap();
                assert_eq!(r.requests.len(), trace.len());
                for (i, q) in r.requests.iter().enumerate() {
                    assert_eq!(q.index, i);
                    assert!(q.replica < 2);
                    assert!(q.arrival == trace[i].arrival_s, "{policy}: {q:?}");
                    assert!(
                        q.arrival < q.first_token && q.first_token <= q.finish,
                        "{q:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn size_based_policies_beat_fcfs_at_high_load() {
        // One replica, 8 running: a decode step of 8 rows takes ~0.0141 s, ~570 tokens/s;
        // 60-token mean outputs at 8.5 req/s is a load of about 0.9. (Measured: FCFS 2.00 s,
        // oracle 1.34 s, TRAIL 1.34 s.)
        let (trace, lens) = synthetic_trace(3000, 8.5, 60.0, 512, (8, 64), 2).unwrap();
        let mean = |p| {
            simulate(&trace, &lens, &cfg(p, 8192, 8), &model())
                .unwrap()
                .mean_latency
        };
        let fcfs = mean(PolicyKind::Fcfs);
        let oracle = mean(PolicyKind::Oracle);
        let trail = mean(PolicyKind::Trail);
        assert!(oracle < 0.8 * fcfs, "oracle {oracle} vs fcfs {fcfs}");
        assert!(trail < 0.8 * fcfs, "trail {trail} vs fcfs {fcfs}");
    }

    #[test]
    fn ten_thousand_requests_finish() {
        let (trace, lens) = synthetic_trace(10_000, 40.0, 60.0, 512, (8, 128), 4).unwrap();
        let mut c = cfg(PolicyKind::Trail, 8192, 32);
        c.replicas = 4;
        c.router = Router::JoinShortestQueue;
        let r = simulate(&trace, &lens, &c, &model()).unwrap();
        assert_eq!(r.requests.len(), 10_000);
        assert!(r.p50_latency <= r.p90_latency && r.p90_latency <= r.p99_latency);
    }

    #[test]
    fn routers_steer_around_a_long_request() {
        // A 500-token request at 0, then short ones every 0.1 s; steps of 10 ms, one running.
        let mut trace = vec![req(0.0, 500)];
        trace.extend((1..=6).map(|i| req(0.1 * i as f64, 5)));
        let lens = vec![4; trace.len()];
        let replicas_of = |router| {
            let mut c = cfg(PolicyKind::Fcfs, 1024, 1);
            c.replicas = 2;
            c.router = router;
            let r = simulate(&trace, &lens, &c, &StepTimeModel::constant(0.01)).unwrap();
            r.requests.iter().map(|q| q.replica).collect::<Vec<_>>()
        };
        assert_eq!(replicas_of(Router::RoundRobin), vec![0, 1, 0, 1, 0, 1, 0]);
        assert_eq!(
            replicas_of(Router::JoinShortestQueue),
            vec![0, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            replicas_of(Router::LeastPredictedWork),
            vec![0, 1, 1, 1, 1, 1, 1]
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = model();
        assert!(simulate(&[], &[], &cfg(PolicyKind::Fcfs, 1024, 4), &m).is_err());
        let mut c = cfg(PolicyKind::Fcfs, 1024, 4);
        c.replicas = 0;
        assert!(simulate(&[req(0.0, 1)], &[4], &c, &m).is_err());
        let no_len = TraceRequest::new(0.0, String::new(), None);
        assert!(simulate(&[no_len], &[4], &cfg(PolicyKind::Fcfs, 1024, 4), &m).is_err());
        // Longer than the KV pool.
        assert!(simulate(&[req(0.0, 2000)], &[4], &cfg(PolicyKind::Fcfs, 1024, 4), &m).is_err());
    }
}
