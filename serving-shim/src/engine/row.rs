//! [`RowSpec`]: one row of a step, built from the scheduler's plan before any executor runs
//! it: the tokens it feeds (a decode's newest token, or a prefill chunk of prompt + generated),
//! where it starts in the request's context, whether it produces a token, and what the
//! predictor's filter needs from it ([`Need`]).

use trail_checkpoints::schedule::Need;

use crate::scheduler::{Chunk, Scheduler, StepPlan};
use crate::sequence::{SeqId, Sequence};

/// One row of a step.
pub(super) struct RowSpec {
    pub(super) id: SeqId,
    /// The tokens it feeds the model.
    pub(super) tokens: Vec<u32>,
    /// How many of `tokens` are prompt tokens.
    pub(super) prompt_tokens: usize,
    /// Context position of its first token (the KV cache must hold exactly this many).
    pub(super) start: usize,
    /// It reaches the end of the request's context: the step produces a token for it.
    pub(super) produces: bool,
    /// Tokens the request had generated before this step.
    pub(super) generated: usize,
    /// `generated` as the filter's row `g`.
    pub(super) g: u32,
    /// The request's cap on generated tokens (the filter's clamp).
    pub(super) cap: u32,
    /// What the filter needs from the row: [`Need::Nothing`] without a predictor or a token.
    pub(super) need: Need,
}

/// The rows of `plan`: decodes, then prefill chunks of prompt + generated. `prompt` gives a
/// request's prompt tokens; `need` what the filter needs from a request's row `g` that
/// produces a token.
pub(super) fn build<'a>(
    plan: &StepPlan,
    sched: &Scheduler,
    prompt: impl Fn(SeqId) -> &'a [u32],
    need: impl Fn(SeqId, u32) -> Need,
) -> Vec<RowSpec> {
    let seq = |id: SeqId| sched.get(id).expect("planned sequences are live");
    let decodes = plan.decode.iter().map(|&id| decode(seq(id)));
    let prefills = plan
        .prefill
        .iter()
        .map(|c| prefill(c, seq(c.id), prompt(c.id)));
    let mut rows: Vec<RowSpec> = decodes.chain(prefills).collect();
    for row in rows.iter_mut().filter(|r| r.produces) {
        row.need = need(row.id, row.g);
    }
    rows
}

/// A decode row: the newest generated token.
fn decode(seq: &Sequence) -> RowSpec {
    let newest = *seq
        .generated
        .last()
        .expect("a decoding sequence has a token");
    RowSpec {
        tokens: vec![newest],
        prompt_tokens: 0,
        start: seq.computed,
        produces: true,
        ..row(seq)
    }
}

/// A prefill row: chunk `c` of prompt + generated.
fn prefill(c: &Chunk, seq: &Sequence, prompt: &[u32]) -> RowSpec {
    let end = c.start + c.len;
    let tokens: Vec<u32> = prompt
        .iter()
        .chain(&seq.generated)
        .skip(c.start)
        .take(c.len)
        .copied()
        .collect();
    RowSpec {
        tokens,
        prompt_tokens: end.min(seq.prompt_len).saturating_sub(c.start),
        start: c.start,
        produces: end == seq.total_len(),
        ..row(seq)
    }
}

/// What every row of `seq` shares, before the tokens are chosen.
fn row(seq: &Sequence) -> RowSpec {
    RowSpec {
        id: seq.id,
        tokens: Vec::new(),
        prompt_tokens: 0,
        start: 0,
        produces: false,
        generated: seq.generated.len(),
        g: u32::try_from(seq.generated.len()).unwrap_or(u32::MAX),
        cap: u32::try_from(seq.max_new_tokens).unwrap_or(u32::MAX),
        need: Need::Nothing,
    }
}
