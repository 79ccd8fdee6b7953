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
