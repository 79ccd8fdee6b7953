fn main() -> std::process::ExitCode {
    rlft::runtime::tune();
    rlft::cli::main_with_args(std::env::args_os())
}
