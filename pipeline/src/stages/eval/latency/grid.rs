//! The [`Grid`] of a run: its seeds × loads × policies, and one trace per (load, seed) at
//! `load ×` the capacity (Poisson arrivals, or gamma gaps under `--burstiness`) (`traces/load=L/seed=S/trace.jsonl`, the format `trail sim trace`
//! replays), shared by every policy of that pair. Cells run seed outermost, so a partial run
//! holds every policy of the (load, seed) pairs it reached, and every other seed runs the
//! policies in reverse (see the module doc of `latency`); they are merged in the order given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use trail_eval::loadgen::workload::{self, Lengths, Prompt};
use trail_eval::loadgen::{Arrivals, TraceRequest, read_trace, write_trace};
use trail_serving_shim::PolicyKind;

use super::Args;
use super::cell::Cell;
use super::config::Config;
use super::saturation::Saturation;
use super::summary::load_key;

/// One (load, seed)'s arrivals.
#[derive(Debug)]
pub struct Trace {
    /// Requests per second.
    pub rate: f64,
    pub requests: Vec<TraceRequest>,
}

/// The cells of a run and their traces.
#[derive(Debug)]
pub struct Grid {
    seeds: Vec<u64>,
    loads: Vec<f64>,
    policies: Vec<PolicyKind>,
    /// By (seed, load key).
    traces: BTreeMap<(u64, String), Trace>,
}

impl Grid {
    /// The grid of `args` and `cfg`, with every trace made (and checked against, or written
    /// to, its file).
    pub fn new(args: &Args, cfg: &Config, sat: &Saturation) -> anyhow::Result<Self> {
        let mut traces = BTreeMap::new();
        for &seed in &args.seeds {
            for &load in &args.loads {
                let spec = TraceSpec {
                    pool: &cfg.pool,
                    n: args.requests,
                    lengths: cfg.lengths,
                    max_tokens: cfg.max_tokens,
                    burstiness: args.burstiness,
                };
                let t = spec.trace_for(&args.out, (load, seed), sat)?;
                traces.insert((seed, load_key(load)), t);
            }
        }
        Ok(Self {
            seeds: args.seeds.clone(),
            loads: args.loads.clone(),
            policies: cfg.policies.clone(),
            traces,
        })
    }

    /// Cells in the grid.
    pub fn len(&self) -> usize {
        self.seeds.len() * self.loads.len() * self.policies.len()
    }

    /// Every cell in merge order: seed, load, then the policies as given.
    pub fn cells(&self) -> Vec<Cell> {
        self.ordered(|_| false)
    }

    /// The cells without results in `out`, in run order: every other seed runs the policies
    /// in reverse.
    pub fn todo(&self, out: &Path) -> Vec<Cell> {
        let mut todo = self.ordered(|k| k % 2 == 1);
        todo.retain(|c| !c.is_done(out));
        todo
    }

    /// Seed outermost, then load, then policy; the policies reversed for the `k`th seed
    /// where `reversed(k)`.
    fn ordered(&self, reversed: impl Fn(usize) -> bool) -> Vec<Cell> {
        let mut cells = Vec::with_capacity(self.len());
        for (k, &seed) in self.seeds.iter().enumerate() {
            let mut order = self.policies.clone();
            if reversed(k) {
                order.reverse();
            }
            for &load in &self.loads {
                for &policy in &order {
                    cells.push(Cell { seed, load, policy });
                }
            }
        }
        cells
    }

    /// The trace a cell replays.
    pub fn trace(&self, cell: &Cell) -> &Trace {
        &self.traces[&(cell.seed, load_key(cell.load))]
    }

    /// Each seed's trace at `load`, in seed order.
    pub fn traces_at(&self, load: f64) -> Vec<Vec<TraceRequest>> {
        self.seeds
            .iter()
            .map(|&seed| self.traces[&(seed, load_key(load))].requests.clone())
            .collect()
    }

    /// Every trace file, by seed then load key.
    pub fn trace_files(&self, out: &Path) -> Vec<PathBuf> {
        self.traces
            .keys()
            .map(|(seed, key)| trace_path(out, key, *seed))
            .collect()
    }
}

/// What every trace of a run is drawn from.
struct TraceSpec<'a> {
    pool: &'a [Prompt],
    n: usize,
    lengths: Lengths,
    max_tokens: u32,
    /// `--burstiness` (1: Poisson).
    burstiness: f64,
}

impl TraceSpec<'_> {
    /// The trace of (load, seed): regenerated from the seed, checked against the file a
    /// previous run wrote (cells already run replayed that file), written when new.
    fn trace_for(
        &self,
        out: &Path,
        (load, seed): (f64, u64),
        sat: &Saturation,
    ) -> anyhow::Result<Trace> {
        let rate = load * sat.rps;
        let arrivals = Arrivals::with_burstiness(rate, self.burstiness)?;
        let trace = workload::arrivals_trace(
            self.pool,
            self.n,
            arrivals,
            seed,
            self.lengths,
            self.max_tokens,
        )
        .with_context(|| format!("load {load}, seed {seed}"))?;
        let path = trace_path(out, &load_key(load), seed);
        if path.is_file() {
            let old = read_trace(&path)?;
            anyhow::ensure!(
                same_trace(&old, &trace),
                "{} differs from the trace these settings make now; use another --out",
                path.display()
            );
        } else {
            write_trace(&path, &trace)?;
        }
        Ok(Trace {
            rate,
            requests: trace,
        })
    }
}

/// Whether a trace read back is the one made now. Arrival times went through JSON text: equal
/// up to the last bit of the decimal.
fn same_trace(old: &[TraceRequest], new: &[TraceRequest]) -> bool {
    old.len() == new.len()
        && old.iter().zip(new).all(|(a, b)| {
            (a.arrival_s - b.arrival_s).abs() <= 1e-9 * b.arrival_s.abs().max(1.0)
                && a.prompt == b.prompt
                && a.output_tokens == b.output_tokens
                && a.max_tokens == b.max_tokens
                && a.request_id == b.request_id
        })
}

/// `traces/load=L/seed=S/trace.jsonl` (`L` a load key).
fn trace_path(out: &Path, load_key: &str, seed: u64) -> PathBuf {
    out.join("traces")
        .join(format!("load={load_key}"))
        .join(format!("seed={seed}"))
        .join("trace.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(seeds: &[u64], loads: &[f64], policies: &[PolicyKind]) -> Grid {
        Grid {
            seeds: seeds.to_vec(),
            loads: loads.to_vec(),
            policies: policies.to_vec(),
            traces: BTreeMap::new(),
        }
    }

    fn names(cells: &[Cell]) -> Vec<String> {
        cells
            .iter()
            .map(|c| format!("{}/{}/{}", c.seed, load_key(c.load), c.policy))
            .collect()
    }

    #[test]
    fn every_other_seed_runs_the_policies_in_reverse_and_merging_keeps_the_given_order() {
        let g = grid(&[1, 2], &[0.5], &[PolicyKind::Fcfs, PolicyKind::Trail]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(g.len(), 4);
        assert_eq!(
            names(&g.todo(dir.path())),
            ["1/0.50/fcfs", "1/0.50/trail", "2/0.50/trail", "2/0.50/fcfs"]
        );
        assert_eq!(
            names(&g.cells()),
            ["1/0.50/fcfs", "1/0.50/trail", "2/0.50/fcfs", "2/0.50/trail"]
        );
        // A cell with results is done.
        let done = Cell {
            seed: 2,
            load: 0.5,
            policy: PolicyKind::Trail,
        };
        trail_fs::write_atomic(&done.results(dir.path()), b"").unwrap();
        assert_eq!(
            names(&g.todo(dir.path())),
            ["1/0.50/fcfs", "1/0.50/trail", "2/0.50/fcfs"]
        );
    }
}
