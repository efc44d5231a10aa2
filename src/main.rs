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

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    /// mimalloc's own name for the option, read from the environment when it starts.
    const VARIABLE: &str = "MIMALLOC_PURGE_DELAY";

    /// The index is the purge delay's: a process started with `MIMALLOC_PURGE_DELAY` set reads
    /// that value under it (a renumbered option in a newer mimalloc fails here, not in production).
    #[test]
    fn the_option_index_names_the_purge_delay() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "tests::purge_delay_from_environment",
            ])
            .env(VARIABLE, "4321")
            .output()
            .expect("test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    #[test]
    #[ignore = "run by the_option_index_names_the_purge_delay, with MIMALLOC_PURGE_DELAY set"]
    fn purge_delay_from_environment() {
        let expected: std::ffi::c_long = std::env::var(VARIABLE)
            .expect("MIMALLOC_PURGE_DELAY set")
            .parse()
            .expect("a number");
        // SAFETY: reads one of mimalloc's global options.
        let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, expected);
    }
}
