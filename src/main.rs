fn main() -> std::process::ExitCode {
    rlft::malloc::tune();
    rlft::cli::main_with_args(std::env::args_os())
}
