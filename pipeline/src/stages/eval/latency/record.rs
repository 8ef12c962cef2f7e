//! The virtual backend's recording pass: every distinct request of the cells to run goes once
//! through the model ([`server::record`]), and the cells replay its tokens and predictor
//! outputs. The recordings are kept in `recordings.jsonl` (a line per request: its key and
//! recording, as JSON, which round-trips f32 exactly), so a resumed run records only the
//! requests it has not seen; `settings.json` pins the model, checkpoint and refresh interval
//! they depend on.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use trail_eval::loadgen::TraceRequest;
use trail_serving_shim::{Recording, RecordingKey, Recordings};

use super::bar;
use super::cell::Cell;
use super::grid::Grid;
use super::server::{self, Launch};
use crate::manifest::write_atomic;

/// Records every distinct request of the cells `todo` not yet in `out`'s
/// `recordings.jsonl` (with the predictor's outputs when `with_predictor`), saves them all,
/// and hands them to `launch`'s engines.
pub fn pass(
    launch: &mut Launch<'_>,
    grid: &Grid,
    todo: &[Cell],
    with_predictor: bool,
    out: &Path,
) -> anyhow::Result<()> {
    let distinct = distinct(grid, todo);
    let path = out.join("recordings.jsonl");
    let recs = Arc::new(load(&path)?);
    launch.recordings = Some(recs.clone());
    let t0 = Instant::now();
    let bar = bar(distinct.len() as u64)?;
    bar.set_message("recording each distinct request once");
    let n = server::record(launch, with_predictor, &distinct, |_| bar.inc(1))?;
    bar.finish_and_clear();
    save(&path, &recs)?;
    eprintln!(
        "recording pass: {n} distinct requests ({} already in {}) in {:.0} s; the cells \
         replay them",
        recs.hits(),
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every distinct request (prompt, length, cap) of the traces of `todo`, in their order.
fn distinct(grid: &Grid, todo: &[Cell]) -> Vec<TraceRequest> {
    let mut seen = HashSet::new();
    let mut distinct = Vec::new();
    for cell in todo {
        for r in &grid.trace(cell).requests {
            if seen.insert((r.prompt.as_str(), r.output_tokens, r.max_tokens)) {
                distinct.push(r.clone());
            }
        }
    }
    distinct
}

/// The recordings in `path`, if it exists.
fn load(path: &Path) -> anyhow::Result<Recordings> {
    let recs = Recordings::new();
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let (key, rec): (RecordingKey, Recording) = serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: not a recording", path.display(), i + 1))?;
            recs.insert(key, rec);
        }
    }
    Ok(recs)
}

/// Writes every recording to `path` (sorted lines, atomically).
fn save(path: &Path, recs: &Recordings) -> anyhow::Result<()> {
    let mut lines = recs
        .entries()
        .iter()
        .map(|(k, r)| serde_json::to_string(&(k, &**r)))
        .collect::<Result<Vec<String>, _>>()?;
    lines.sort();
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trail_serving_shim::{GenRequest, PredictorEvent};

    #[test]
    fn recordings_round_trip_through_their_file_to_the_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recordings.jsonl");
        assert!(load(&path).unwrap().is_empty(), "no file: nothing recorded");
        let recs = Recordings::new();
        let rec = Recording {
            tokens: vec![7, 8],
            events: Some(vec![PredictorEvent {
                generated: 0,
                probs: vec![0.1_f32, 0.2, 0.700_000_05],
                prompt: Some(vec![f32::MIN_POSITIVE, 1.0 / 3.0]),
            }]),
        };
        for n in [3, 4] {
            recs.insert(
                RecordingKey::of(&GenRequest::greedy(vec![1, 2], n)),
                rec.clone(),
            );
        }
        save(&path, &recs).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.len(), 2);
        for n in [3, 4] {
            let key = RecordingKey::of(&GenRequest::greedy(vec![1, 2], n));
            assert_eq!(*back.get(&key, true).unwrap(), rec);
        }
        save(&path, &back).unwrap();
        let again = std::fs::read_to_string(&path).unwrap();
        save(&path, &recs).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            again,
            "sorted lines"
        );
    }
}
