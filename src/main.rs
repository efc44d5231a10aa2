//! The `onboard` command.

/// mimalloc instead of the system allocator: a gateway holding tens of thousands of sessions
/// fragments glibc's heap, and every allocation then pays for it (see the fleet benchmark). It
/// costs the QoS 1 relay 17 to 29% of its rate (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    onboard::cli::main()
}
