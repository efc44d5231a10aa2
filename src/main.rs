//! The `onboard` command.

fn main() -> std::process::ExitCode {
    onboard::cli::main()
}
