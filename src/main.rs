//! The `veer` binary: parses the command line and hands over to [`veer::cli`].
#![allow(clippy::disallowed_methods)]

/// jemalloc rather than the system allocator: measured with `benches/proxy_bench.sh`, it
/// takes less CPU per proxied request and keeps idle connections smaller (see
/// benches/README.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    veer::cli::main()
}
