//! Shell habits: completion scripts from clap's generator for every subcommand, and a
//! `--version` that names the build's features.

mod common;
use common::*;

const SUBCOMMANDS: [&str; 13] = [
    "logprobs",
    "generate",
    "sft",
    "merge",
    "dashboard",
    "bench",
    "demo",
    "ppo",
    "grpo",
    "rm",
    "dpo",
    "pairs",
    "completions",
];

/// Each shell's script is that shell's (its own header / registration) and knows every
/// subcommand and a stage's flags; an unknown shell is a usage error listing the known ones.
#[test]
fn completions_cover_every_subcommand_in_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _rlft"),
        ("zsh", "#compdef rlft"),
        ("fish", "complete -c rlft"),
    ] {
        let o = rlft(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains(marker), "{shell}: no `{marker}`");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no `{sub}`");
        }
        assert!(
            script.contains("quantization") && script.contains("resume"),
            "{shell}: flags"
        );
    }
    let o = rlft(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("tcsh") && err.contains("bash") && err.contains("fish"),
        "{err}"
    );
}

/// `rlft --version`: the crate version, whether CUDA is in the build, and exactly the CPU
/// features this process detects.
#[test]
fn version_names_the_build_and_the_cpu_features() {
    let o = rlft(&["--version"]);
    assert!(o.status.success());
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        v.starts_with(&format!("rlft {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let cuda = if cfg!(feature = "cuda") {
        "cuda: yes"
    } else {
        "cuda: no"
    };
    assert!(v.contains(cuda), "{v}");
    let mpi = if cfg!(feature = "mpi") {
        "mpi: yes"
    } else {
        "mpi: no"
    };
    assert!(v.contains(mpi), "{v}");
    #[cfg(target_arch = "x86_64")]
    for f in ["avx2", "fma", "f16c", "avx512f"] {
        let has = match f {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            _ => std::arch::is_x86_feature_detected!("avx512f"),
        };
        assert_eq!(v.contains(f), has, "{f} in {v}");
    }
}
