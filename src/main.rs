fn main() -> std::process::ExitCode {
    rlft::runtime::tune();
    // MPI when a launcher started this process (`--features mpi`), else one rank.
    if let Err(e) = rlft::dist::init() {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let code = rlft::cli::main_with_args(std::env::args_os());
    rlft::dist::finalize();
    code
}
