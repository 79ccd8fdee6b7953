//! Parquet datasets: every fixture under tests/fixtures/data/ was written by `datasets` /
//! pyarrow from its JSONL twin (tests/fixtures/make_parquet.py), and reads back row for row as
//! the twin does, through the same row shapes and the same errors; lists and globs of files,
//! every codec, damaged files.

mod common;
use common::*;
use rlft::config::{self, sft::SftConfig};
use rlft::data::preference::COLUMNS as PAIR_COLUMNS;
use rlft::data::prompts::load_prompts;
use rlft::data::sft::COLUMNS as SFT_COLUMNS;
use rlft::data::{read_rows, Columns, DataFiles, Place, Row};
use rlft::policies::Tokenizer;
use rlft::preference::load_pairs;
use rlft::sft::{load_examples, run, RunOptions};
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    fixture("data").join(name)
}

fn files(names: &[&str]) -> DataFiles {
    DataFiles::new(names.iter().map(|n| data(n)).collect())
}

fn tok() -> Tokenizer {
    Tokenizer::load(&fixture("llama")).unwrap()
}

fn rows(names: &[&str], columns: Columns) -> Vec<Row> {
    read_rows(&files(names), columns).unwrap()
}

/// The parquet twin holds the JSONL file's rows, field for field, in order; JSONL rows are
/// numbered by line from 1, parquet rows from 0.
fn assert_twins(jsonl: &[Row], parquet: &[Row]) {
    assert_eq!(jsonl.len(), parquet.len());
    for (i, (j, p)) in jsonl.iter().zip(parquet).enumerate() {
        assert_eq!(j.fields, p.fields, "row {i}");
        assert_eq!(j.place, Place::Line(i + 1));
        assert_eq!(p.place, Place::Row(i));
    }
}

#[test]
fn every_parquet_twin_reads_as_its_jsonl_file_row_for_row() {
    for name in [
        "sft",
        "sft_chat",
        "prefs",
        "prefs_chat",
        "prompts",
        "prompts_chat",
    ] {
        let jsonl = rows(&[&format!("{name}.jsonl")], Columns::All);
        let parquet = rows(&[&format!("{name}.parquet")], Columns::All);
        assert_twins(&jsonl, &parquet);
    }
    // Spot checks of the conversion itself: a list of structs is a list of messages, an
    // integer an integer, a float a float, a null cell an absent field.
    let chat = rows(&["sft_chat.parquet"], Columns::All);
    assert_eq!(chat[0].fields["messages"][2]["role"], "assistant");
    assert_eq!(chat[0].fields["messages"][2]["content"], "47");
    assert!(!chat[2].fields.contains_key("prompt"), "a null prompt cell");
    let prompts = rows(&["prompts.parquet"], Columns::All);
    assert_eq!(prompts[1].fields["id"], 1);
    assert_eq!(prompts[1].fields["difficulty"], 0.25);
    assert!(!prompts[2].fields.contains_key("difficulty"));
}

#[test]
fn the_stages_tokenize_parquet_as_they_tokenize_jsonl() {
    let t = tok();
    for name in ["sft", "sft_chat"] {
        let j = load_examples(&files(&[&format!("{name}.jsonl")]), &t, true, 64).unwrap();
        let p = load_examples(&files(&[&format!("{name}.parquet")]), &t, true, 64).unwrap();
        assert_eq!(j, p, "{name}");
        assert!(j.iter().any(|e| e.n_trained() > 0));
    }
    for name in ["prefs", "prefs_chat"] {
        let j = load_pairs(&files(&[&format!("{name}.jsonl")]), &t, 64).unwrap();
        let p = load_pairs(&files(&[&format!("{name}.parquet")]), &t, 64).unwrap();
        assert_eq!(j, p, "{name}");
    }
    let margins: Vec<f32> = load_pairs(&files(&["prefs.parquet"]), &t, 64)
        .unwrap()
        .iter()
        .map(|p| p.margin)
        .collect();
    assert_eq!(margins, [1.5, 0.0, 0.0, -0.25, 0.0]);
    for name in ["prompts", "prompts_chat"] {
        let j = load_prompts(&files(&[&format!("{name}.jsonl")]), &t, 64).unwrap();
        let p = load_prompts(&files(&[&format!("{name}.parquet")]), &t, 64).unwrap();
        assert_eq!(j.len(), p.len());
        for (a, b) in j.iter().zip(&p) {
            assert_eq!((&a.text, &a.ids, &a.fields), (&b.text, &b.ids, &b.fields));
        }
        assert!(p.iter().all(|x| x.fields.contains_key("answer")), "{name}");
    }
}

#[test]
fn only_the_columns_a_stage_uses_are_read() {
    let all = rows(&["sft.parquet"], Columns::All);
    assert!(all.iter().all(|r| r.fields.contains_key("source")));
    let some = rows(&["sft.parquet"], Columns::Only(SFT_COLUMNS));
    assert_eq!(some.len(), all.len());
    for (s, a) in some.iter().zip(&all) {
        assert!(!s.fields.contains_key("source"));
        let mut a = a.fields.clone();
        a.remove("source");
        assert_eq!(s.fields, a);
    }
    let err = read_rows(&files(&["no_columns.parquet"]), Columns::Only(PAIR_COLUMNS))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no_columns.parquet")
            && err.contains("expected a column among")
            && err.contains(r#"the file has ["question", "answer"]"#),
        "{err}"
    );
}

#[test]
fn every_codec_and_row_group_size_reads_alike() {
    let reference = rows(&["prefs.parquet"], Columns::All);
    for codec in ["none", "snappy", "gzip", "zstd", "lz4", "brotli"] {
        let got = rows(&[&format!("prefs.{codec}.parquet")], Columns::All);
        assert_eq!(got.len(), reference.len(), "{codec}");
        for (g, r) in got.iter().zip(&reference) {
            assert_eq!((&g.fields, g.place), (&r.fields, r.place), "{codec}");
        }
    }
}

#[test]
fn lists_and_globs_of_files_read_in_order() {
    let whole = rows(&["sft.parquet"], Columns::All);
    let listed = rows(
        &["sft-00000-of-00002.parquet", "sft-00001-of-00002.parquet"],
        Columns::All,
    );
    let globbed = rows(&["sft-*-of-00002.parquet"], Columns::All);
    for shards in [&listed, &globbed] {
        let fields: Vec<_> = shards.iter().map(|r| &r.fields).collect();
        assert_eq!(fields, whole.iter().map(|r| &r.fields).collect::<Vec<_>>());
        let places: Vec<_> = shards.iter().map(|r| r.place).collect();
        assert_eq!(
            places,
            [0, 1, 0, 1, 2].map(Place::Row),
            "each shard counts its own rows"
        );
        assert!(shards[1].file.ends_with("sft-00000-of-00002.parquet"));
        assert!(shards[2].file.ends_with("sft-00001-of-00002.parquet"));
    }
    // JSONL and parquet in one list.
    let mixed = rows(&["sft.jsonl", "sft-*.parquet"], Columns::All);
    assert_eq!(mixed.len(), 2 * whole.len());
    assert_eq!(mixed[5].fields, whole[0].fields);
    // A list in the config file, and an empty string still unsets an optional key.
    let cfg: SftConfig = config::load(
        None,
        &[
            format!(
                "data.train_file=[{:?}, {:?}]",
                data("sft.jsonl").display().to_string(),
                data("sft-*.parquet").display().to_string()
            ),
            "data.eval_file=\"\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.data.train_file.entries().len(), 2);
    assert_eq!(cfg.data.eval_file, None);
}

/// The error a bad JSONL row gives, and the one its parquet twin gives: the same message
/// after the place (`file:line: field` against `file: row N: column`).
fn twin_errors(name: &str, line: usize, field: &str) {
    let t = tok();
    let j = load_pairs(&files(&[&format!("{name}.jsonl")]), &t, 64)
        .unwrap_err()
        .to_string();
    let p = load_pairs(&files(&[&format!("{name}.parquet")]), &t, 64)
        .unwrap_err()
        .to_string();
    let j_at = format!("{name}.jsonl:{line}: field `{field}`: ");
    let p_at = format!("{name}.parquet: row {}: column `{field}`: ", line - 1);
    let j_msg = j.split_once(&j_at).unwrap_or_else(|| panic!("{j}")).1;
    let p_msg = p.split_once(&p_at).unwrap_or_else(|| panic!("{p}")).1;
    assert_eq!(j_msg, p_msg);
}

#[test]
fn bad_rows_are_named_by_file_row_and_column() {
    twin_errors("bad_same", 2, "rejected");
    twin_errors("bad_missing", 2, "rejected");
    twin_errors("bad_margin", 1, "margin");
    twin_errors("bad_kinds", 1, "rejected");
    let err = load_pairs(&files(&["nan_margin.parquet"]), &tok(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nan_margin.parquet: row 1: column `margin`: NaN is not a finite number"),
        "{err}"
    );
    let err = read_rows(&files(&["missing.parquet"]), Columns::All)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read data file") && err.contains("missing.parquet"),
        "{err}"
    );
}

#[test]
fn damaged_files_are_errors_naming_them_never_panics() {
    let dir = std::env::temp_dir().join(format!("rlft-parquet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(data("prefs.snappy.parquet")).unwrap();
    let check = |bytes: &[u8], must_fail: bool| {
        let p = dir.join("damaged.parquet");
        std::fs::write(&p, bytes).unwrap();
        match read_rows(&DataFiles::from(p.as_path()), Columns::All) {
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("damaged.parquet"), "{e}");
            }
            Ok(rows) => assert!(!must_fail, "read {} rows", rows.len()),
        }
    };
    // A JSONL file under a parquet name, an empty file, a truncated one.
    check(&std::fs::read(data("prefs.jsonl")).unwrap(), true);
    check(b"", true);
    check(&good[..good.len() / 2], true);
    check(&good[..good.len() - 9], true);
    // Seeded single-byte damage everywhere in the file: an error or (where the byte does not
    // matter) rows, but never a panic out of the reader.
    let mut state = 0x2545_f491_u64;
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bytes = good.clone();
        let at = (state % bytes.len() as u64) as usize;
        bytes[at] ^= 1 << (state >> 32) % 8;
        check(&bytes, false);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Through the binary: a bad row and a damaged file are one clear error line each, and the
/// reader's own panic message never reaches the user.
#[test]
fn the_binary_reports_bad_parquet_without_a_panic() {
    let dir = std::env::temp_dir().join(format!("rlft-parquet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(data("prefs.snappy.parquet")).unwrap();
    // One bit of a page header flipped: parquet 60.1's reader panics on it (a slice out of
    // range), which must still come out as an error line.
    let mut bytes = good.clone();
    bytes[802] ^= 1 << 6;
    let damaged = dir.join("damaged.parquet");
    std::fs::write(&damaged, &bytes).unwrap();
    let model = format!("model.path={:?}", fixture("llama").display().to_string());
    let out = format!(
        "training.output_dir={:?}",
        dir.join("out").display().to_string()
    );
    for (file, want) in [
        (
            data("bad_same.parquet"),
            "bad_same.parquet: row 1: column `rejected`: the same as `chosen`".to_string(),
        ),
        (
            damaged.clone(),
            format!("{}: not a readable parquet file", damaged.display()),
        ),
    ] {
        let train = format!("data.train_file={:?}", file.display().to_string());
        let o = rlft(&["dpo", "--set", &model, "--set", &train, "--set", &out]);
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(err.contains(&want), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!dir.join("out").join("adapter").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An SFT run on parquet shards (a glob) logs the very losses of the run on the JSONL twin.
#[test]
fn sft_on_parquet_shards_trains_exactly_as_on_the_jsonl_twin() {
    let run_on = |train: &Path, out: &Path| {
        let sets = vec![
            format!("model.path={:?}", fixture("llama").display().to_string()),
            format!("data.train_file={:?}", train.display().to_string()),
            format!(
                "training.output_dir={:?}",
                out.join("out").display().to_string()
            ),
            "training.learning_rate=5e-3".into(),
            "training.max_steps=4".into(),
            "training.per_device_train_batch_size=2".into(),
            "training.logging_steps=1".into(),
        ];
        let cfg: SftConfig = config::load(None, &sets).unwrap();
        run(
            &cfg,
            &RunOptions {
                resume: None,
                quiet: true,
            },
        )
        .unwrap();
        metrics(out)
            .iter()
            .filter_map(|m| Some((m.get("train/loss")?.as_f64()?, m["grad_norm"].as_f64()?)))
            .collect::<Vec<_>>()
    };
    let dir = std::env::temp_dir().join(format!("rlft-parquet-sft-{}", std::process::id()));
    let jsonl = run_on(&data("sft.jsonl"), &dir.join("jsonl"));
    let parquet = run_on(&data("sft-*-of-00002.parquet"), &dir.join("parquet"));
    assert_eq!(jsonl.len(), 4);
    assert_eq!(jsonl, parquet);
    std::fs::remove_dir_all(&dir).unwrap();
}
