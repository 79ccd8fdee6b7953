//! `training.report_to = ["tensorboard"]`: the event file under `output_dir/runs/` read back
//! by a reader written here from the format's definition (record framing, a bitwise CRC-32C,
//! the protobuf fields), every scalar equal to the same step's value in `metrics.jsonl`.

mod common;
use common::*;
use rlft::config::{self, sft::SftConfig};
use rlft::sft::{run, RunOptions};
use std::collections::BTreeMap;

/// CRC-32C bit by bit (no table), then TensorFlow's mask.
fn masked_crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    let c = !c;
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*i];
        *i += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// The fields of one protobuf message: (field number, raw bytes of a length-delimited or
/// fixed field, or the varint's value in 8 LE bytes).
fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let key = varint(b, &mut i);
        let v = match key & 7 {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, v));
    }
    out
}

#[test]
fn tensorboard_events_carry_every_scalar_of_metrics_jsonl() {
    let tmp = TempDir::new("tensorboard");
    let data = tmp.0.join("train.jsonl");
    let rows: String = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"{i}+1=\", \"completion\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let sets = [
        format!("model.path={:?}", fixture("llama").display().to_string()),
        format!("data.train_file={:?}", data.display().to_string()),
        format!(
            "training.output_dir={:?}",
            tmp.0.join("out").display().to_string()
        ),
        "training.max_steps=5".into(),
        "training.logging_steps=1".into(),
        "training.per_device_train_batch_size=4".into(),
        "training.report_to=[\"tensorboard\"]".into(),
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

    let runs = tmp.0.join("out/runs");
    let files: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let (mut i, mut events) = (0, Vec::new());
    while i < bytes.len() {
        let len = &bytes[i..i + 8];
        assert_eq!(
            u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap()),
            masked_crc(len)
        );
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let data = &bytes[i + 12..i + 12 + n];
        let crc = u32::from_le_bytes(bytes[i + 12 + n..i + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc(data), "record at byte {i}");
        events.push(fields(data));
        i += 16 + n;
    }
    // The first event names the format.
    assert!(events[0]
        .iter()
        .any(|(f, v)| *f == 3 && v.as_slice() == b"brain.Event:2"));
    // Each event after the first is one metrics.jsonl line with a step, in order: the same
    // step and every number of the line (booleans as 0/1) under its name, as f32.
    let tb: Vec<(u64, BTreeMap<String, f32>)> = events[1..]
        .iter()
        .map(|e| {
            let step = e
                .iter()
                .find(|(f, _)| *f == 2)
                .map(|(_, v)| u64::from_le_bytes(v[..8].try_into().unwrap()))
                .unwrap();
            let summary = &e.iter().find(|(f, _)| *f == 5).unwrap().1;
            let values = fields(summary)
                .into_iter()
                .map(|(_, value)| {
                    let vf = fields(&value);
                    let tag =
                        String::from_utf8(vf.iter().find(|(f, _)| *f == 1).unwrap().1.clone())
                            .unwrap();
                    let x = f32::from_le_bytes(
                        vf.iter().find(|(f, _)| *f == 2).unwrap().1[..4]
                            .try_into()
                            .unwrap(),
                    );
                    (tag, x)
                })
                .collect();
            (step, values)
        })
        .collect();
    let lines: Vec<serde_json::Value> = metrics(&tmp.0)
        .into_iter()
        .filter(|r| r["step"].as_u64().is_some())
        .collect();
    assert_eq!(tb.len(), lines.len());
    let mut checked = 0;
    for ((step, values), r) in tb.iter().zip(&lines) {
        assert_eq!(Some(*step), r["step"].as_u64());
        let want: BTreeMap<String, f32> = r
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| match v {
                serde_json::Value::Bool(b) => Some((k.clone(), *b as u8 as f32)),
                v => v.as_f64().map(|x| (k.clone(), x as f32)),
            })
            .collect();
        assert_eq!(values, &want, "step {step}");
        checked += want.len();
    }
    assert!(checked >= 5 * 3, "{checked} scalars");
    for step in 1..=5 {
        assert!(
            tb.iter()
                .any(|(s, v)| *s == step && v.contains_key("train/loss")),
            "train/loss at {step}"
        );
    }
    // An unknown integration is refused, naming the supported one.
    let mut bad = cfg.clone();
    bad.training.report_to = vec!["wandb".into()];
    let err = run(
        &bad,
        &RunOptions {
            resume: None,
            quiet: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"wandb\"") && err.contains("tensorboard"),
        "{err}"
    );
}
