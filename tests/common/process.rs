//! `onboard serve` as a child process, for tests where several gateways share one store.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `onboard serve`; killed when dropped.
pub struct Served {
    child: Child,
    /// Its mTLS listener (devices and admins).
    pub mtls: SocketAddr,
    /// Its metrics endpoint.
    pub metrics: SocketAddr,
}

impl Served {
    /// Start `onboard serve --config onboard.toml` in `dir` and wait for its banner.
    pub fn start(dir: &Path) -> Served {
        Served::start_with_env(dir, &[])
    }

    /// [`Served::start`] with environment variables (`ONBOARD_<SECTION>_<KEY>` overrides).
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_onboard"))
            .args(["serve", "--config", "onboard.toml"])
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("onboard serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (mtls, metrics) = loop {
            let line = lines
                .next()
                .expect("banner before exit")
                .expect("stderr line");
            if let Some(rest) = line.strip_prefix("onboard listening: mTLS ") {
                let address = |text: &str| -> SocketAddr {
                    let text = text.split(['/', ' ']).next().expect("address");
                    text.parse().expect("socket address")
                };
                let metrics = rest
                    .split_once("metrics http://")
                    .map(|(_, m)| address(m))
                    .expect("metrics address in the banner");
                break (address(rest), metrics);
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Served {
            child,
            mtls,
            metrics,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `onboard.toml` on ephemeral loopback ports, with the repository's templates and
/// `extra` TOML appended (its own sections).
pub fn write_config(dir: &Path, extra: &str) {
    let toml = format!(
        "[server]\nmtls_listen = \"127.0.0.1:0\"\npassword_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n\
         [enrollment]\ntemplates_dir = \"{}\"\n{extra}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates")
    );
    std::fs::write(dir.join("onboard.toml"), toml).expect("config written");
}
