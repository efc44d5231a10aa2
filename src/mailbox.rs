//! Sessions the gateway serves itself: bootstrap and device clients.
//!
//! Everything a device subscribes to is private to it (its configuration, firmware job,
//! renewed certificate, commands addressed to it), and the only other end of that traffic is
//! the gateway or an admin. So a device's subscriptions are not registered with the broker,
//! whose router compares every new topic and filter with every other one: they live here,
//! keyed by the device, and cost the same whatever the size of the fleet.
//!
//! A session holds the client's subscriptions, the QoS 1 messages waiting for it (bounded by
//! `[limits] max_queued_per_device`; the oldest is dropped and counted) and those sent but not
//! yet acknowledged (resent, with DUP, when a persistent session reconnects). The retained
//! private topics of every enrolled device (configuration and firmware job) are kept here too,
//! so that each subscribe, and each reconnect after a gateway restart, gets them without a
//! store round trip.
//!
//! Bootstrap and device sessions of one id are different keys: a factory certificate never
//! sees, takes over or ends the device's session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use dashmap::DashMap;
use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::topics::{self, Private};

/// Which of a device's two identities a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Factory certificate: may only enroll.
    Bootstrap,
    /// Operational credential.
    Device,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub kind: Kind,
    pub id: Box<str>,
}

impl SessionKey {
    pub fn bootstrap(id: &str) -> SessionKey {
        SessionKey {
            kind: Kind::Bootstrap,
            id: id.into(),
        }
    }

    pub fn device(id: &str) -> SessionKey {
        SessionKey {
            kind: Kind::Device,
            id: id.into(),
        }
    }
}

/// An application message on its way to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// QoS it was published with (0 or 1; QoS 2 is delivered as 1).
    pub qos: u8,
    /// Set only on a retained message sent because of a new subscription.
    pub retain: bool,
}

impl Message {
    pub fn new(topic: &str, payload: Bytes, qos: u8) -> Message {
        Message {
            topic: Arc::from(topic),
            payload,
            qos: qos.min(1),
            retain: false,
        }
    }
}

/// A message to write now: with a packet id when it is QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub message: Message,
    pub pkid: Option<u16>,
    /// A resend of a message the client may have seen already.
    pub dup: bool,
}

/// Bounds of every session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages waiting to be sent, per session.
    pub queued: usize,
    /// QoS 1 messages sent and not yet acknowledged, per connection.
    pub inflight: usize,
}

#[derive(Debug)]
struct Subscription {
    filter: Box<str>,
    qos: u8,
}

/// The connection a session is attached to.
#[derive(Debug)]
struct Attachment {
    id: u64,
    wake: Arc<Notify>,
    kill: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// `clean_session = 0`: kept while the client is away.
    persistent: bool,
    subscriptions: Vec<Subscription>,
    /// Not yet sent.
    queue: VecDeque<Message>,
    /// Sent at QoS 1, not yet acknowledged.
    inflight: VecDeque<(u16, Message)>,
    /// Inflight messages of an earlier connection, to resend first (with DUP).
    resend: VecDeque<(u16, Message)>,
    last_pkid: u16,
    attached: Option<Attachment>,
}

impl State {
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let pkid = self.last_pkid;
            let taken = |q: &VecDeque<(u16, Message)>| q.iter().any(|(p, _)| *p == pkid);
            if !taken(&self.inflight) && !taken(&self.resend) {
                return pkid;
            }
        }
    }

    /// QoS a message on `topic` is delivered with, if any subscription matches.
    fn granted(&self, topic: &str) -> Option<u8> {
        self.subscriptions
            .iter()
            .filter(|s| topics::matches(&s.filter, topic))
            .map(|s| s.qos)
            .max()
    }
}

/// Every gateway-served session, and the retained private topics of every device.
pub struct Mailboxes {
    sessions: DashMap<SessionKey, Arc<Mutex<State>>>,
    /// Device id -> payloads of its retained private topics, in [`Private::RETAINED`] order.
    retained: DashMap<Box<str>, [Option<Bytes>; 2]>,
    limits: Limits,
    /// Counts messages dropped from a full queue.
    dropped: IntCounter,
    next_connection: AtomicU64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The messages of one device's retained payloads that `filter` matches.
fn retained_messages(id: &str, kept: &[Option<Bytes>; 2], filter: &str) -> Vec<Message> {
    Private::RETAINED
        .iter()
        .zip(kept.iter())
        .filter_map(|(kind, payload)| {
            let topic = kind.topic(id);
            let payload = payload.as_ref()?;
            topics::matches(filter, &topic).then(|| Message {
                topic: Arc::from(topic),
                payload: payload.clone(),
                qos: 1,
                retain: true,
            })
        })
        .collect()
}

fn retained_slot(kind: Private) -> Option<usize> {
    Private::RETAINED.iter().position(|k| *k == kind)
}

impl Mailboxes {
    pub fn new(limits: Limits, dropped: IntCounter) -> Mailboxes {
        Mailboxes {
            sessions: DashMap::new(),
            retained: DashMap::new(),
            limits,
            dropped,
            next_connection: AtomicU64::new(1),
        }
    }

    /// Attach a new connection to the session `key`, ending the connection that held it (MQTT
    /// session take-over). A clean session starts empty and ends with the connection; a
    /// persistent one resumes what was kept, and [`Attached::present`] says whether there was
    /// anything.
    pub fn attach(
        self: &Arc<Self>,
        key: SessionKey,
        clean: bool,
        kill: CancellationToken,
    ) -> Attached {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let attachment = Attachment {
            id,
            wake: wake.clone(),
            kill,
        };
        let mut present = false;
        let session = {
            let entry = self.sessions.entry(key.clone()).or_default();
            let mut state = lock(entry.value());
            if let Some(old) = state.attached.take() {
                old.kill.cancel();
            }
            if clean || !state.persistent {
                *state = State::default();
            } else {
                present = true;
                let unacked = std::mem::take(&mut state.inflight);
                state.resend.extend(unacked);
            }
            state.persistent = !clean;
            state.attached = Some(attachment);
            entry.value().clone()
        };
        // Something may be waiting already (a resumed session).
        wake.notify_one();
        Attached {
            mailboxes: self.clone(),
            key,
            session,
            connection: id,
            wake,
            present,
        }
    }

    /// Deliver `message` to the session `key` if it subscribed to the topic. A session whose
    /// client is away keeps QoS 1 messages only.
    pub fn deliver(&self, key: &SessionKey, message: Message) {
        let Some(session) = self.sessions.get(key).map(|s| s.value().clone()) else {
            return;
        };
        let mut state = lock(&session);
        let Some(granted) = state.granted(&message.topic) else {
            return;
        };
        let qos = granted.min(message.qos);
        if qos == 0 && state.attached.is_none() {
            return;
        }
        self.enqueue(&mut state, Message { qos, ..message });
    }

    fn enqueue(&self, state: &mut State, message: Message) {
        if state.queue.len() >= self.limits.queued {
            state.queue.pop_front();
            self.dropped.inc();
        }
        state.queue.push_back(message);
        if let Some(attached) = &state.attached {
            attached.wake.notify_one();
        }
    }

    /// Keep (or with `None`, forget) the retained payload of one of device `id`'s retained
    /// private topics.
    pub fn set_retained(&self, id: &str, kind: Private, payload: Option<Bytes>) {
        let Some(slot) = retained_slot(kind) else {
            return;
        };
        match payload {
            // Kept in a buffer of its own size: a payload serialised into a growing buffer
            // can hold twice its length, for as long as the device is enrolled.
            Some(payload) => {
                self.retained.entry(id.into()).or_default()[slot] =
                    Some(Bytes::copy_from_slice(&payload));
            }
            None => {
                if let Some(mut kept) = self.retained.get_mut(id) {
                    kept[slot] = None;
                }
                self.retained
                    .remove_if(id, |_, kept| kept.iter().all(Option::is_none));
            }
        }
    }

    /// The retained messages of device `id` that `filter` matches.
    pub fn retained(&self, id: &str, filter: &str) -> Vec<Message> {
        self.retained
            .get(id)
            .map(|kept| retained_messages(id, &kept, filter))
            .unwrap_or_default()
    }

    /// The retained private messages of every device that `filter` matches. A filter that
    /// names one device costs a lookup; one across the fleet (`devices/+/config`, `devices/#`:
    /// observers only, devices cannot subscribe so) walks every device, as any broker would.
    pub fn retained_matching(&self, filter: &str) -> Vec<Message> {
        if let Some(id) = topics::filter_device(filter) {
            return self.retained(id, filter);
        }
        if !filter.starts_with("devices/") && !filter.starts_with('#') && !filter.starts_with('+') {
            return Vec::new();
        }
        self.retained
            .iter()
            .flat_map(|entry| retained_messages(entry.key(), entry.value(), filter))
            .collect()
    }

    /// Sessions held (connected or kept for an absent client).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn detach(&self, key: &SessionKey, session: &Arc<Mutex<State>>, connection: u64) {
        let mut state = lock(session);
        if state.attached.as_ref().map(|a| a.id) != Some(connection) {
            return; // taken over: the session belongs to the newer connection
        }
        state.attached = None;
        if state.persistent {
            return;
        }
        drop(state);
        self.sessions.remove_if(key, |_, current| {
            Arc::ptr_eq(current, session) && lock(current).attached.is_none()
        });
    }
}

/// One connection's hold on its session. Dropping it detaches the connection.
pub struct Attached {
    mailboxes: Arc<Mailboxes>,
    key: SessionKey,
    session: Arc<Mutex<State>>,
    connection: u64,
    /// Notified whenever a message is queued for this connection.
    pub wake: Arc<Notify>,
    /// A persistent session was resumed (CONNACK session-present).
    pub present: bool,
}

impl Attached {
    pub fn key(&self) -> &SessionKey {
        &self.key
    }

    /// Add (or change the QoS of) a subscription, then queue the retained messages it matches.
    pub fn subscribe(&self, filter: &str, qos: u8, retained: Vec<Message>) {
        let mut state = lock(&self.session);
        match state
            .subscriptions
            .iter_mut()
            .find(|s| &*s.filter == filter)
        {
            Some(existing) => existing.qos = qos,
            None => state.subscriptions.push(Subscription {
                filter: filter.into(),
                qos,
            }),
        }
        for message in retained {
            let qos = qos.min(message.qos);
            self.mailboxes
                .enqueue(&mut state, Message { qos, ..message });
        }
    }

    /// Whether the session holds `filter` already.
    pub fn holds(&self, filter: &str) -> bool {
        lock(&self.session)
            .subscriptions
            .iter()
            .any(|s| &*s.filter == filter)
    }

    /// Filters the session holds.
    pub fn subscriptions(&self) -> usize {
        lock(&self.session).subscriptions.len()
    }

    pub fn unsubscribe(&self, filter: &str) {
        lock(&self.session)
            .subscriptions
            .retain(|s| &*s.filter != filter);
    }

    /// The next message to write, if any may be sent now (QoS 1 ones wait while the in-flight
    /// window is full).
    pub fn next(&self) -> Option<Outgoing> {
        let mut state = lock(&self.session);
        if state.attached.as_ref().map(|a| a.id) != Some(self.connection) {
            return None;
        }
        if state.inflight.len() < self.mailboxes.limits.inflight {
            if let Some((pkid, message)) = state.resend.pop_front() {
                state.inflight.push_back((pkid, message.clone()));
                return Some(Outgoing {
                    message,
                    pkid: Some(pkid),
                    dup: true,
                });
            }
        }
        let window_full = state.inflight.len() >= self.mailboxes.limits.inflight;
        let position = state
            .queue
            .iter()
            .position(|m| m.qos == 0 || !window_full)?;
        let message = state.queue.remove(position)?;
        let pkid = (message.qos > 0).then(|| {
            let pkid = state.next_pkid();
            state.inflight.push_back((pkid, message.clone()));
            pkid
        });
        Some(Outgoing {
            message,
            pkid,
            dup: false,
        })
    }

    /// The client acknowledged the QoS 1 message `pkid`.
    pub fn acked(&self, pkid: u16) {
        let mut state = lock(&self.session);
        if let Some(at) = state.inflight.iter().position(|(p, _)| *p == pkid) {
            state.inflight.remove(at);
            if let Some(attached) = &state.attached {
                attached.wake.notify_one();
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.mailboxes
            .detach(&self.key, &self.session, self.connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailboxes(queued: usize, inflight: usize) -> Arc<Mailboxes> {
        let dropped = IntCounter::new("dropped", "dropped").expect("counter");
        Arc::new(Mailboxes::new(Limits { queued, inflight }, dropped))
    }

    fn command(n: u8) -> Message {
        Message::new("devices/d1/commands/x", Bytes::from(vec![n]), 1)
    }

    fn drain(attached: &Attached) -> Vec<Outgoing> {
        std::iter::from_fn(|| attached.next()).collect()
    }

    #[test]
    fn delivers_only_what_was_subscribed() {
        let m = mailboxes(10, 10);
        let a = m.attach(SessionKey::device("d1"), true, CancellationToken::new());
        m.deliver(&SessionKey::device("d1"), command(1));
        assert!(a.next().is_none(), "not subscribed yet");
        a.subscribe("devices/d1/commands/#", 1, Vec::new());
        m.deliver(&SessionKey::device("d1"), command(2));
        m.deliver(&SessionKey::bootstrap("d1"), command(3));
        let out = drain(&a);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].message.payload.as_ref(), &[2]);
        assert_eq!(out[0].pkid, Some(1));
    }

    #[test]
    fn clean_session_ends_with_its_connection() {
        let m = mailboxes(10, 10);
        let a = m.attach(SessionKey::device("d1"), true, CancellationToken::new());
        a.subscribe("#", 1, Vec::new());
        drop(a);
        assert_eq!(m.sessions(), 0);
    }

    #[test]
    fn persistent_session_queues_while_away_and_resends_unacked() {
        let m = mailboxes(3, 10);
        let key = SessionKey::device("d1");
        let a = m.attach(key.clone(), false, CancellationToken::new());
        assert!(!a.present);
        a.subscribe("devices/d1/commands/#", 1, Vec::new());
        m.deliver(&key, command(1));
        let first = drain(&a);
        assert_eq!(first.len(), 1);
        drop(a); // command 1 never acked
        for n in 2..=5 {
            m.deliver(&key, command(n));
        }
        let b = m.attach(key.clone(), false, CancellationToken::new());
        assert!(b.present);
        let out = drain(&b);
        let payloads: Vec<u8> = out.iter().map(|o| o.message.payload[0]).collect();
        assert_eq!(
            payloads,
            vec![1, 3, 4, 5],
            "unacked first, then the newest 3"
        );
        assert!(out[0].dup);
        assert_eq!(out[0].pkid, first[0].pkid);
        assert_eq!(m.dropped.get(), 1);
        for o in &out {
            b.acked(o.pkid.expect("qos 1"));
        }
        drop(b);
        let c = m.attach(key.clone(), false, CancellationToken::new());
        assert!(drain(&c).is_empty(), "acked messages are gone");
        let d = m.attach(key, true, CancellationToken::new());
        assert!(!d.present, "a clean connect discards the session");
    }

    #[test]
    fn take_over_ends_the_older_connection() {
        let m = mailboxes(10, 10);
        let first_kill = CancellationToken::new();
        let a = m.attach(SessionKey::device("d1"), false, first_kill.clone());
        a.subscribe("devices/d1/#", 1, Vec::new());
        let b = m.attach(SessionKey::device("d1"), false, CancellationToken::new());
        assert!(first_kill.is_cancelled());
        m.deliver(&SessionKey::device("d1"), command(1));
        assert!(a.next().is_none(), "the older connection gets nothing");
        drop(a);
        assert_eq!(drain(&b).len(), 1, "its detach did not end the session");
    }

    #[test]
    fn inflight_window_holds_back_qos1_but_not_qos0() {
        let m = mailboxes(10, 1);
        let key = SessionKey::device("d1");
        let a = m.attach(key.clone(), true, CancellationToken::new());
        a.subscribe("devices/d1/#", 1, Vec::new());
        m.deliver(&key, command(1));
        m.deliver(&key, command(2));
        m.deliver(
            &key,
            Message::new("devices/d1/commands/y", Bytes::from_static(b"q0"), 0),
        );
        let out = drain(&a);
        assert_eq!(out.len(), 2, "one QoS 1 in flight, plus the QoS 0 one");
        a.acked(out[0].pkid.expect("qos 1"));
        assert_eq!(drain(&a).len(), 1);
    }

    #[test]
    fn retained_private_topics_match_filters() {
        let m = mailboxes(10, 10);
        m.set_retained("d1", Private::Config, Some(Bytes::from_static(b"c")));
        m.set_retained("d1", Private::Firmware, Some(Bytes::from_static(b"f")));
        assert_eq!(m.retained("d1", "devices/d1/#").len(), 2);
        assert_eq!(m.retained("d1", "devices/d1/config").len(), 1);
        assert!(m.retained("d1", "devices/d1/commands/#").is_empty());
        assert!(m.retained("d2", "devices/d2/#").is_empty());
        m.set_retained("d1", Private::Config, None);
        m.set_retained("d1", Private::Firmware, None);
        assert!(
            m.retained.is_empty(),
            "nothing kept for a device without retained topics"
        );
    }
}
