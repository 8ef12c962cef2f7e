//! The target-model runner on the real SmolLM2-135M-Instruct Q4_1: token ids, greedy first
//! token and per-layer hidden states against HF transformers (`shared/fixtures`), and the
//! determinism properties (batch invariance, prefill ≡ decode) on real weights, with both KV
//! cache formats (f16, the default, and f32, the numerics before issue 23), on the SIMD path
//! `TRAIL_SIMD` names (run once per path to cover them all).

use std::sync::OnceLock;

use trail_llm::{KvCache, KvFormat, LayerSet, Row, Runner, StepOutput};

#[derive(serde::Deserialize)]
struct Fixture {
    items: Vec<Item>,
}

#[derive(serde::Deserialize)]
struct Item {
    user: String,
    chat_text: String,
    ids: Vec<u32>,
    raw_instruction_ids: Vec<u32>,
    /// 31 × 576: HF hidden_states of the last prompt token.
    last_token: Vec<Vec<f32>>,
    /// 31 × 576: HF hidden_states averaged over the prompt.
    mean_prompt: Vec<Vec<f32>>,
    next_token_argmax: u32,
}

fn runner() -> &'static Runner {
    runner_with(KvFormat::default())
}

/// SmolLM2 with caches in `kv`, loaded once per format.
fn runner_with(kv: KvFormat) -> &'static Runner {
    static RUNNERS: [OnceLock<Runner>; 2] = [OnceLock::new(), OnceLock::new()];
    RUNNERS[kv as usize].get_or_init(|| {
        let mut r = Runner::load(&trail_tests::smollm2_gguf()).expect("load SmolLM2");
        r.set_kv_format(kv);
        eprintln!("SmolLM2: {}", r.kernel_id());
        r
    })
}

/// Both KV cache formats, the default first.
const KV_FORMATS: [KvFormat; 2] = [KvFormat::F16, KvFormat::F32];

fn fixture() -> Fixture {
    let path = trail_tests::fixture_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Checks runner layer `l` (normed for the last layer) against HF state `l + 1`, with the
/// off-by-one guard: closer to `l + 1` than to `l` and `l + 2`.
fn check_layer(what: &str, item: usize, l: usize, ours: &[f32], hf: &[Vec<f32>]) {
    let c = cosine(ours, &hf[l + 1]);
    assert!(
        c >= 0.99,
        "item {item} {what} layer {l}: cosine {c:.5} < 0.99"
    );
    let before = cosine(ours, &hf[l]);
    assert!(
        c > before,
        "item {item} {what} layer {l}: closer to HF state {l} ({before:.5})"
    );
    if l + 2 < hf.len() {
        let after = cosine(ours, &hf[l + 2]);
        assert!(
            c > after,
            "item {item} {what} layer {l}: closer to HF state {} ({after:.5})",
            l + 2
        );
    }
}

#[test]
fn smollm2_matches_hf_ids_first_token_and_hidden_states() {
    for kv in KV_FORMATS {
        matches_hf(runner_with(kv));
    }
}

fn matches_hf(runner: &Runner) {
    let n_layers = runner.config().num_hidden_layers;
    assert_eq!(n_layers, 30);
    let all = LayerSet::all(n_layers);
    for (i, item) in fixture().items.iter().enumerate() {
        assert_eq!(
            runner.render_chat(&item.user).unwrap(),
            item.chat_text,
            "item {i}"
        );
        assert_eq!(
            runner.encode_chat(&item.user).unwrap(),
            item.ids,
            "item {i}"
        );
        assert_eq!(
            runner.encode(&item.user).unwrap(),
            item.raw_instruction_ids,
            "item {i}"
        );

        let mut cache = runner.model().new_cache();
        let out = runner.model().prefill(&mut cache, &item.ids, all).unwrap();
        assert_eq!(
            out.argmax(0),
            item.next_token_argmax,
            "item {i}: greedy first token"
        );
        let (mean_layers, mean) = cache.prompt_mean().expect("prompt mean");
        assert_eq!(mean_layers, all);
        assert_eq!(cache.prompt_tokens(), item.ids.len());
        let h = runner.config().hidden_size;
        for l in 0..n_layers {
            let mut last = out.hidden(0, l).unwrap().to_vec();
            let mut avg: Vec<f32> = mean[l * h..(l + 1) * h].to_vec();
            if l == n_layers - 1 {
                // the runner's layers stay pre-norm; HF's last state has the final norm.
                // HF's state 30 is normed per token, so its prompt mean is a mean of normed
                // states, not the norm of the mean.
                last = runner.model().final_norm(&last);
                avg = mean_of_normed(runner, &item.ids, l);
            }
            check_layer("last token", i, l, &last, &item.last_token);
            check_layer("prompt mean", i, l, &avg, &item.mean_prompt);
        }
    }
}

/// Mean over the prompt of the final-normed last layer (HF's `hidden_states[30]` mean),
/// from one-token prefixes of the prompt fed as prefill chunks.
fn mean_of_normed(runner: &Runner, ids: &[u32], layer: usize) -> Vec<f32> {
    let mut cache = runner.model().new_cache();
    let mut sum = vec![0f64; runner.config().hidden_size];
    for t in ids.chunks(1) {
        let out = runner
            .model()
            .prefill(&mut cache, t, LayerSet::single(layer))
            .unwrap();
        for (s, v) in sum
            .iter_mut()
            .zip(runner.model().final_norm(out.hidden(0, layer).unwrap()))
        {
            *s += v as f64;
        }
    }
    sum.iter().map(|s| (s / ids.len() as f64) as f32).collect()
}

fn assert_same(a: &StepOutput, ra: usize, b: &StepOutput, rb: usize, what: &str) {
    assert!(a.logits(ra) == b.logits(rb), "{what}: logits differ");
    assert!(
        a.row_hidden(ra) == b.row_hidden(rb),
        "{what}: hidden states differ"
    );
}

fn same_kv(a: &KvCache, b: &KvCache, n_layers: usize) -> bool {
    a.len() == b.len()
        && (0..n_layers).all(|l| a.keys(l) == b.keys(l) && a.values(l) == b.values(l))
}

#[test]
fn smollm2_rows_are_batch_invariant_and_prefill_equals_decode() {
    for kv in KV_FORMATS {
        batch_invariant(runner_with(kv));
    }
}

fn batch_invariant(runner: &Runner) {
    let model = runner.model();
    let n_layers = runner.config().num_hidden_layers;
    let all = LayerSet::all(n_layers);
    let a = runner
        .encode_chat("Give three tips for staying healthy.")
        .unwrap();
    let b = runner.encode_chat("Hi").unwrap();
    let c = runner
        .encode_chat("Write a haiku about autumn leaves falling.")
        .unwrap();
    assert_ne!(a.len(), b.len());

    // A alone: prefill, then 3 greedy decode steps.
    let mut solo = model.new_cache();
    let mut solo_out = vec![model.prefill(&mut solo, &a, all).unwrap()];
    let mut gen_a = vec![solo_out[0].argmax(0)];
    for _ in 0..3 {
        let t = *gen_a.last().unwrap();
        let out = model.decode(&mut [&mut solo], &[t], all).unwrap();
        gen_a.push(out.argmax(0));
        solo_out.push(out);
    }

    // A batched: its prefill shares a step with B's (different length); its decode steps share
    // a batch with B decoding and with C's prefill chunks arriving.
    let (mut ca, mut cb, mut cc) = (model.new_cache(), model.new_cache(), model.new_cache());
    let out = model
        .step(
            &mut [Row::prefill(&mut cb, &b), Row::prefill(&mut ca, &a)],
            all,
        )
        .unwrap();
    assert_same(&out, 1, &solo_out[0], 0, "prefill beside another prefill");
    let mut tb = out.argmax(0);
    let c_chunks: Vec<&[u32]> = c.chunks(c.len().div_ceil(3)).collect();
    for (k, chunk) in c_chunks.iter().enumerate() {
        let ta = gen_a[k];
        let out = model
            .step(
                &mut [
                    Row::prefill(&mut cc, chunk),
                    Row::decode(&mut ca, &ta),
                    Row::decode(&mut cb, &tb),
                ],
                all,
            )
            .unwrap();
        assert_same(
            &out,
            1,
            &solo_out[k + 1],
            0,
            &format!("decode step {k} in a mixed batch"),
        );
        tb = out.argmax(2);
    }
    assert!(
        same_kv(&ca, &solo, n_layers),
        "batched KV differs from solo KV"
    );

    // C's chunked prefill (in mixed batches) equals C prefilled whole, alone, mean included.
    let mut c_whole = model.new_cache();
    let out_c = model.prefill(&mut c_whole, &c, all).unwrap();
    let mut c_again = model.new_cache();
    let mut last = None;
    for chunk in &c_chunks {
        last = Some(model.prefill(&mut c_again, chunk, all).unwrap());
    }
    assert_same(&out_c, 0, last.as_ref().unwrap(), 0, "chunked prefill");
    assert!(same_kv(&cc, &c_whole, n_layers));
    assert_eq!(cc.prompt_mean(), c_whole.prompt_mean());

    // Prefill of prompt + 3 generated tokens ≡ prefill + 3 decode steps (recompute preemption).
    let mut re = model.new_cache();
    let mut tokens = a.clone();
    tokens.extend_from_slice(&gen_a[..3]);
    let out = model
        .step(&mut [Row::new(&mut re, &tokens, a.len())], all)
        .unwrap();
    assert_same(&out, 0, &solo_out[3], 0, "re-prefill after preemption");
    assert!(same_kv(&re, &solo, n_layers), "re-prefilled KV differs");
    assert_eq!(re.prompt_mean(), solo.prompt_mean());
}

/// Prompts that hold special-token text literally, in the carried Alpaca (of 26,932) and in
/// ShareGPT (of 17,382), measured by this test: none, so encoding user text without
/// special-token parsing changed no prompt's ids, and no label made by `trail generate`.
const ALPACA_WITH_SPECIAL_TEXT: usize = 0;
const SHAREGPT_WITH_SPECIAL_TEXT: usize = 0;

/// For each prompt: the chat ids as `trail generate` makes them now (special tokens only from
/// the template) against the old encoding (the rendered chat parsed for special tokens).
/// Returns (prompts holding special-token text, of those whose ids changed).
fn compare_encodings(runner: &Runner, prompts: &[String]) -> (usize, usize) {
    let (mut special, mut changed) = (0, 0);
    for p in prompts {
        let now = runner.encode_chat(p).unwrap();
        let before = runner
            .encode_with_specials(&runner.render_chat(p).unwrap())
            .unwrap();
        if runner.has_special_text(p) {
            special += 1;
            changed += usize::from(now != before);
        } else {
            assert_eq!(now, before, "{p:?}");
        }
    }
    (special, changed)
}

#[test]
fn corpus_prompts_keep_their_token_ids_unless_they_hold_special_token_text() {
    use trail_datasets::corpus::{Corpus, Options};
    let runner = runner();
    let (alpaca, _) = Corpus::carried_alpaca().load(Options::default()).unwrap();
    let alpaca: Vec<String> = alpaca.into_iter().map(|r| r.prompt).collect();
    let sharegpt = trail_llm::hub::SHAREGPT
        .ensure()
        .expect("the ShareGPT corpus (trail fetch sharegpt)");
    let (sharegpt, _) = Corpus::sharegpt(&sharegpt)
        .load(Options::default())
        .unwrap();
    let sharegpt: Vec<String> = sharegpt.into_iter().map(|r| r.prompt).collect();
    let a = compare_encodings(runner, &alpaca);
    let s = compare_encodings(runner, &sharegpt);
    eprintln!(
        "special-token text: alpaca {} of {} ({} changed), sharegpt {} of {} ({} changed)",
        a.0,
        alpaca.len(),
        a.1,
        s.0,
        sharegpt.len(),
        s.1
    );
    assert_eq!(a, (ALPACA_WITH_SPECIAL_TEXT, ALPACA_WITH_SPECIAL_TEXT));
    assert_eq!(s, (SHAREGPT_WITH_SPECIAL_TEXT, SHAREGPT_WITH_SPECIAL_TEXT));
}
