//! The `veer` binary: parses the command line and hands over to [`veer::cli`].

fn main() -> std::process::ExitCode {
    veer::cli::main()
}
