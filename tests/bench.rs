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
