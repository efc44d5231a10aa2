//! The `onboard` command.

/// mimalloc instead of the system allocator: a gateway holding tens of thousands of sessions
/// fragments glibc's heap, and every allocation then pays for it (see the fleet benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 2's `mimalloc.h` (the crate does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    onboard::cli::main()
}

/// Freed memory stays with the allocator for reuse instead of going back to the OS 10 ms later.
/// The broker's message log frees and reallocates multi-megabyte segments all the time; with
/// purging, each new one faulted in fresh zeroed pages, and fan-out through the gateway lost 20
/// to 30% of its rate (throughput benchmark). The price: resident memory stays at its high-water
/// mark, as it mostly does with glibc.
fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's global options; any value is valid (-1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
