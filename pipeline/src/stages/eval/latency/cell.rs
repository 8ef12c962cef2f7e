//! A [`Cell`] of the grid: one policy at one load with one seed. A fresh server replays the
//! (load, seed) trace open-loop; the cell's requests go to
//! `cells/policy=P/load=L/seed=S/results.parquet`, written last and atomically (a cell with
//! that file is done and skipped on rerun), beside the server's step log `steps.parquet`,
//! `metrics.prom` and log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use trail_eval::loadgen::{ResultRow, TraceRequest, write_results};
use trail_serving_shim::PolicyKind;

use super::server::{Launch, Server};
use super::summary::load_key;

/// One policy at one load with one seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub seed: u64,
    pub load: f64,
    pub policy: PolicyKind,
}

impl Cell {
    /// `cells/policy=P/load=L/seed=S` under `out`.
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join("cells")
            .join(format!("policy={}", self.policy.as_str()))
            .join(format!("load={}", load_key(self.load)))
            .join(format!("seed={}", self.seed))
    }

    /// The cell's `results.parquet`.
    pub fn results(&self, out: &Path) -> PathBuf {
        self.dir(out).join("results.parquet")
    }

    /// The cell ran to its results.
    pub fn is_done(&self, out: &Path) -> bool {
        self.results(out).is_file()
    }

    /// The policy runs the length predictor in the loop.
    pub fn uses_predictor(&self) -> bool {
        matches!(self.policy, PolicyKind::Trail | PolicyKind::Sprpt)
    }

    /// Runs the cell on a fresh server replaying `trace`, whose arrivals come at `rate`
    /// (`on_done` per request), and writes its results; returns the line that reports it.
    pub fn run(
        &self,
        launch: &Launch<'_>,
        rt: &tokio::runtime::Runtime,
        (rate, trace): (f64, &[TraceRequest]),
        out: &Path,
        on_done: impl Fn(),
    ) -> anyhow::Result<String> {
        let Self { seed, load, policy } = *self;
        let dir = self.dir(out);
        let t0 = Instant::now();
        let server = Server::start(launch, policy, &dir)?;
        let results = server.drive(rt, trace, |_| on_done());
        server.stop(&dir)?;
        let rows: Vec<ResultRow> = results
            .into_iter()
            .zip(trace)
            .map(|(result, req)| ResultRow {
                policy: policy.as_str().to_string(),
                load,
                rate_rps: rate,
                seed,
                target_tokens: req.output_tokens,
                result,
            })
            .collect();
        let failed = rows.iter().filter(|r| r.result.error.is_some()).count();
        write_results(&self.results(out), &rows)?;
        let mean = rows.iter().map(|r| r.result.latency_s).sum::<f64>() / rows.len() as f64;
        Ok(format!(
            "{policy:>8} load {load:.2} seed {seed}: {} requests ({failed} failed), mean latency \
             {mean:.2} s, {:.0} s",
            rows.len(),
            t0.elapsed().as_secs_f64()
        ))
    }
}
