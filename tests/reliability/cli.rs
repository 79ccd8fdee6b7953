//! Command-line flags and subcommands.

use super::*;

bad_input!(generate_top_p_out_of_range, |_d| case(
    "generate: top_p out of range",
    vec![
        s("generate"),
        s("--model"),
        fixture("llama").display().to_string(),
        s("--prompt"),
        s("hi"),
        s("--top-p"),
        s("2"),
    ],
    &["top_p", "(0, 1]"],
));

bad_input!(unknown_subcommand, |_d| case(
    "unknown subcommand",
    vec![s("trian")],
    &["trian"],
));
