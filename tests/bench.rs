//! `rlft bench` plumbing: each workload prints one JSON object with the documented keys
//! (the figures themselves are benchmarks, not test assertions).

mod common;
use common::*;

#[test]
fn bench_workloads_print_the_documented_json() {
    let tmp = TempDir::new("bench");
    for (w, extra) in [
        ("W1", &["--batch", "2", "--len", "8"][..]),
        ("W2", &["--batch", "2", "--len", "4"]),
        ("W4", &[]),
    ] {
        let mut args = vec![
            "bench",
            "--workload",
            w,
            "--json",
            "--work",
            tmp.0.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = rlft(&args);
        assert!(o.status.success(), "{w}: {}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(stdout(&o).trim().lines().last().unwrap()).unwrap();
        assert_eq!(v["workload"], w);
        for k in [
            "seconds_per_step",
            "tokens_per_s",
            "samples_per_s",
            "peak_rss_mb",
        ] {
            assert!(v.get(k).is_some(), "{w}: key {k} in {v}");
        }
        assert!(v["seconds_per_step"].as_f64().unwrap() > 0.0);
        assert!(v["peak_rss_mb"].as_f64().unwrap() > 1.0);
    }
}

/// W1 reports its FLOPs from the shape (4 · linear parameters · tokens, hand-counted here
/// for the small Llama), and the RL workloads refuse shapes they do not run at.
#[test]
fn w1_flops_follow_the_shape_and_rl_workloads_refuse_the_gpu_shape() {
    let tmp = TempDir::new("bench-shape");
    let work = tmp.0.to_str().unwrap();
    let o = rlft(&[
        "bench",
        "--workload",
        "W1",
        "--json",
        "--work",
        work,
        "--batch",
        "2",
        "--len",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(stdout(&o).trim().lines().last().unwrap()).unwrap();
    // Per layer: q, o 256×256; k, v 256×128 (4 KV heads of 32); gate, up, down 256×688;
    // 4 layers, and lm_head 256×512.
    let per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 688;
    let linear = 4 * per_layer + 256 * 512;
    assert_eq!(
        v["flops_per_step"].as_f64().unwrap(),
        (4 * linear * 2 * 8) as f64
    );
    assert_eq!(v["shape"], "small");
    let o = rlft(&[
        "bench",
        "--workload",
        "W3",
        "--shape",
        "gpu",
        "--json",
        "--work",
        work,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("small shape in f32 only"),
        "{}",
        stderr(&o)
    );
    let o = rlft(&["bench", "--shape", "huge"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown shape `huge`"),
        "{}",
        stderr(&o)
    );
}

/// W5 and W6 (issue 13's real-size workloads) at a tiny size: a random model of a
/// `config.json` (`--shape PATH`) and a model folder as it is (`--model DIR`); checkpointing
/// says plainly when the build lacks it; the default suite stays W1–W4.
#[test]
fn w5_and_w6_run_on_a_config_and_a_folder() {
    let tmp = TempDir::new("bench-scale");
    let work = tmp.0.to_str().unwrap();
    let qwen = fixture("qwen2");
    let cfg = qwen.join("config.json");
    for (w, from) in [
        ("W5", ["--shape", cfg.to_str().unwrap()]),
        ("W6", ["--model", qwen.to_str().unwrap()]),
        ("W5", ["--model", qwen.to_str().unwrap()]),
    ] {
        let mut args = vec!["bench", "--workload", w, "--json", "--work", work];
        args.extend([
            "--batch", "2", "--len", "6", "--steps", "1", "--dtype", "bf16",
        ]);
        args.extend(from);
        let o = rlft(&args);
        assert!(o.status.success(), "{w}: {}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(stdout(&o).trim().lines().last().unwrap()).unwrap();
        assert_eq!(v["workload"], w);
        assert_eq!(v["model_type"], "qwen2");
        assert_eq!(v["dtype"], "bf16");
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["peak_rss_mb"].as_f64().unwrap() > 1.0, "{v}");
        if w == "W5" {
            assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
            assert_eq!(v["gradient_checkpointing"], false);
            // The fixture's head is tied: the count has no lm_head.
            let per_layer = 2 * 64 * 64 + 2 * 64 * 32 + (64 + 2 * 32) + 3 * 64 * 128 + 2 * 64;
            assert_eq!(v["params"], 512 * 64 + 2 * per_layer + 64);
        } else {
            assert_eq!(v["new_tokens"], 6);
            assert_eq!(v["prompt_len"], 16);
        }
    }
    let o = rlft(&[
        "bench",
        "--workload",
        "W5",
        "--gradient-checkpointing",
        "--batch",
        "2",
        "--len",
        "6",
        "--steps",
        "1",
        "--work",
        work,
        "--model",
        qwen.to_str().unwrap(),
    ]);
    if !o.status.success() {
        assert!(
            stderr(&o).contains("gradient checkpointing is not available in this build"),
            "{}",
            stderr(&o)
        );
    }
}
