//! `onboard`: an MQTT broker with a zero-touch enrollment gateway built in.
//!
//! # Layout
//!
//! ```text
//!  device / admin ──TLS──▶ front ──loopback──▶ broker (embedded rumqttd)
//!                           │  identity, topic rules      │ local link
//!                           ▼                             ▼
//!                       lifecycle ◀──────────────────── enroll ──▶ pki
//!                           │                             │
//!                           └──────────▶ store ◀──────────┘   metrics (HTTP)
//! ```
//!
//! - [`config`]: the TOML file and its `ONBOARD_<SECTION>_<KEY>` overrides.
//! - [`pki`]: CAs, client-certificate verification, issuing operational credentials.
//! - [`front`]: TLS accept, who the client is (role + device id), the topic rules, and the
//!   hand-off of authenticated connections to the broker.
//! - [`broker`]: the embedded rumqttd, reachable only from the front, and the gateway's own link.
//! - [`enroll`]: the bootstrap protocol on `enroll/D/request`.
//! - [`lifecycle`]: activation, deadlines, rollback, admin commands.
//! - [`admin`]: the admin plane (config, rollback, firmware, revoke, reinstate) and renewals.
//! - [`import`]: bulk provisioning from CSV.
//! - [`store`]: the inventory trait with its `sqlite` and `mssql` backends.
//! - [`metrics`]: Prometheus registry and the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`gateway`]: wires everything into one running process.
//! - [`cli`]: the `onboard` command line.

pub mod admin;
pub mod audit;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod front;
pub mod gateway;
pub mod import;
pub mod lifecycle;
pub mod mailbox;
pub mod metrics;
pub mod password;
pub mod pki;
pub mod simulate;
pub mod store;
pub mod templates;
pub mod topics;
