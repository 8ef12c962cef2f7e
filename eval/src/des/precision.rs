//! Runs the simulator until its interval is tight enough: a run whose 95 % interval comes out
//! wider than [`Precision::rel_ci95`] of its mean is repeated with the jobs that the interval's
//! width asks for (it shrinks as 1/√jobs, plus a 20 % margin), up to [`Precision::max_jobs`].
//!
//! A rerun draws the same stream, longer, so its result is what a first run of that many jobs
//! gives: the outcome depends on the configuration, not on how many tries it took.

use super::{SimConfig, SimResult, simulate};
use crate::Error;
use crate::dist::Joint;
use crate::policy::Policy;

/// How tight a simulated mean must be, and the most jobs a run may take to get there.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Precision {
    /// The widest 95 % half-width allowed, relative to the mean (0.01: ±1 %).
    pub rel_ci95: f64,
    /// Jobs a rerun may not exceed.
    pub max_jobs: u64,
}

/// What [`simulate_precise`] reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Measured jobs finished so far in the current run (it rises within a run and ends at
    /// the run's jobs).
    Jobs(u64),
    /// The interval came out too wide: a run of this many jobs starts over.
    Rerun(u64),
}

impl Precision {
    /// Jobs for a rerun of a simulation whose interval came out `rel_ci` wide with `jobs`:
    /// enough for [`rel_ci95`](Self::rel_ci95) with a 20 % margin, at most
    /// [`max_jobs`](Self::max_jobs); `None` when it is narrow enough or `jobs` already reached
    /// the cap.
    pub fn rerun_jobs(&self, jobs: u64, rel_ci: f64) -> Option<u64> {
        if rel_ci <= self.rel_ci95 || jobs >= self.max_jobs {
            return None;
        }
        let want = (jobs as f64 * (rel_ci / self.rel_ci95).powi(2) * 1.2).ceil() as u64;
        Some(want.clamp(jobs + 1, self.max_jobs))
    }
}

/// [`simulate`] with `cfg`, then again with more jobs (the same seed) while the interval is
/// wider than `precision` asks and the cap allows. `progress` hears every run's finished jobs
/// and every rerun.
pub fn simulate_precise(
    joint: &Joint,
    policy: Policy,
    cfg: &SimConfig,
    precision: &Precision,
    progress: &mut dyn FnMut(Progress),
) -> Result<SimResult, Error> {
    let mut cfg = *cfg;
    let mut sim = simulate(joint, policy, &cfg, &mut |done| {
        progress(Progress::Jobs(done))
    })?;
    while let Some(jobs) = precision.rerun_jobs(cfg.jobs, sim.rel_ci95()) {
        progress(Progress::Rerun(jobs));
        cfg.jobs = jobs;
        sim = simulate(joint, policy, &cfg, &mut |done| {
            progress(Progress::Jobs(done))
        })?;
    }
    Ok(sim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{Predictions, Sizes};

    fn target(rel_ci95: f64, max_jobs: u64) -> Precision {
        Precision { rel_ci95, max_jobs }
    }

    #[test]
    fn a_wide_interval_asks_for_the_jobs_that_narrow_it_within_the_cap() {
        let p = target(0.01, 10_000);
        assert_eq!(p.rerun_jobs(1_000, 0.009), None);
        // 2 % with 1,000 jobs: 4× the jobs for 1 %, and a 20 % margin.
        assert_eq!(p.rerun_jobs(1_000, 0.02), Some(4_800));
        assert_eq!(p.rerun_jobs(1_000, 0.1), Some(10_000));
        assert_eq!(p.rerun_jobs(10_000, 0.1), None);
        assert!(p.rerun_jobs(1_000, 0.010_001).is_some_and(|j| j > 1_000));
    }

    fn exp_joint() -> Joint {
        Joint::model(Sizes::exponential(1.0).unwrap(), Predictions::Exact).unwrap()
    }

    fn cfg(jobs: u64) -> SimConfig {
        SimConfig {
            load: 0.8,
            jobs,
            warmup: 500,
            batches: 10,
            seed: 9,
        }
    }

    #[test]
    fn reruns_until_the_interval_is_tight_and_ends_as_a_first_run_of_its_jobs() {
        let joint = exp_joint();
        let precision = target(0.05, 200_000);
        let mut events = Vec::new();
        let sim = simulate_precise(&joint, Policy::Fcfs, &cfg(2_000), &precision, &mut |p| {
            events.push(p)
        })
        .unwrap();
        let reruns: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Progress::Rerun(j) => Some(*j),
                Progress::Jobs(_) => None,
            })
            .collect();
        // 2,000 jobs at load 0.8 are far from ±5 %: at least one rerun, each asking for more.
        assert!(!reruns.is_empty(), "{events:?}");
        assert!(reruns.windows(2).all(|w| w[0] < w[1]), "{reruns:?}");
        let last = *reruns.last().unwrap();
        assert!(sim.rel_ci95() <= 0.05 || last == 200_000, "{sim:?}");
        // Every run reports its jobs done, the last one with the final count.
        assert_eq!(events.last(), Some(&Progress::Jobs(last)));
        // The same stream, longer: a first run of the final jobs gives the same result.
        let direct = simulate(&joint, Policy::Fcfs, &cfg(last), &mut |_| {}).unwrap();
        assert_eq!(sim, direct);
    }

    #[test]
    fn a_tight_enough_first_run_is_kept_and_the_cap_stops_reruns() {
        let joint = exp_joint();
        let mut reruns = 0;
        let loose = target(1.0, 1_000_000);
        let sim = simulate_precise(&joint, Policy::Srpt, &cfg(2_000), &loose, &mut |p| {
            reruns += u32::from(matches!(p, Progress::Rerun(_)))
        })
        .unwrap();
        assert_eq!(reruns, 0);
        assert_eq!(sim.jobs, 2_000);
        // A cap at the first run's jobs: nothing more may run, however wide the interval.
        let capped = target(1e-9, 2_000);
        let sim =
            simulate_precise(&joint, Policy::Srpt, &cfg(2_000), &capped, &mut |_| {}).unwrap();
        assert_eq!(sim.jobs, 2_000);
    }
}
