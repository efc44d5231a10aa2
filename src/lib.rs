//! `onboard`: an MQTT broker with a zero-touch enrollment gateway built in.
//!
//! # Layout
//!
//! ```text
//!  device ──TLS──▶ front ─── its session: subscriptions, queue, retained ◀── bus ◀── enroll, admin,
//!                   │  identity, topic rules      (mailbox)                          lifecycle, audit
//!                   │── gateway topics (inbox) ──▶ enroll / admin
//!                   └── telemetry, events, state ──▶ broker (rumqttd: fan-out) ──▶ admins, back-ends
//!  admin  ──TLS──▶ front ──relay──▶ broker                  store ◀── everything; metrics (HTTP)
//! ```
//!
//! - [`config`]: the TOML file and its `ONBOARD_<SECTION>_<KEY>` overrides.
//! - [`pki`]: CAs, client-certificate verification (with the admin revocation list and the
//!   operational CAs a rotation retired), issuing operational credentials, `pki check`.
//! - [`front`]: TLS accept, who the client is (role + device id), the topic rules; serves
//!   bootstrap and device sessions itself and relays admins to the broker.
//! - [`topics`]: the topic vocabulary, built and parsed in one place; which topics are private
//!   to a device and which are fanned out.
//! - [`mailbox`]: the sessions the gateway serves (subscriptions, bounded queues, QoS 1
//!   redelivery) and every device's retained configuration and firmware job.
//! - [`bus`]: what the gateway publishes, routed to a device's session or to the broker.
//! - [`broker`]: the embedded rumqttd, the fan-out engine for admins and back-ends.
//! - [`enroll`]: the bootstrap protocol on `enroll/D/request`.
//! - [`lifecycle`]: activation, deadlines, rollback.
//! - [`admin`]: the admin plane (config, rollback, firmware, revoke, reinstate) and renewals.
//! - [`audit`]: the audit log's writer and its live view on `admin/events/...`.
//! - [`feed`]: applies what other gateways sharing the store changed (revocations,
//!   configurations, firmware jobs), polled from the store's change feed.
//! - [`quota`]: how many credentials one device may be issued per hour.
//! - [`import`]: bulk provisioning from CSV.
//! - [`store`]: the inventory trait with its `sqlite` and `mssql` backends.
//! - [`metrics`]: Prometheus registry and the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`gateway`]: wires everything into one running process; reloads its PKI and templates.
//! - [`simulate`]: the fleet simulator behind `onboard simulate` and the benchmarks.
//! - [`cli`]: the `onboard` command line.

pub mod admin;
pub mod audit;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod feed;
pub mod front;
pub mod gateway;
pub mod import;
pub mod lifecycle;
pub mod mailbox;
pub mod metrics;
pub mod password;
pub mod pki;
pub mod quota;
pub mod simulate;
pub mod store;
pub mod templates;
pub mod topics;
