//! Bytes a client sends on a front connection: frame boundaries, CONNECT (and its rewrite for
//! the internal listener), PUBLISH, SUBSCRIBE, UNSUBSCRIBE and SUBACK, then the topic rules on
//! every topic and filter read. Nothing here may panic, loop or allocate past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onboard::front::codec::{self, kind};
use onboard::front::rules::{allowed, Action, Principal};
use onboard::pki::Role;

/// The front's largest accepted packet in these runs (small, so the limit itself is exercised).
const MAX_PACKET: usize = 4096;

fn principals() -> [Principal; 3] {
    [Role::Bootstrap, Role::Device, Role::Admin].map(|role| Principal {
        role,
        id: "dev-1".into(),
    })
}

fn check_topic(action: Action, topic: &str) {
    for who in &principals() {
        let _ = allowed(who, action, topic);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = codec::parse_connect(data) {
        let _ = codec::internal_connect(&packet, "front", "secret");
    }
    let mut buf = data;
    while let Ok(Some(frame)) = codec::frame(buf, MAX_PACKET) {
        assert!(frame.len <= buf.len() && frame.len <= MAX_PACKET);
        let bytes = &buf[..frame.len];
        match frame.kind() {
            kind::PUBLISH => {
                let _ = codec::publish_topic(bytes, &frame);
                if let Ok(publish) = codec::parse_publish(bytes, &frame) {
                    check_topic(Action::Publish, publish.topic);
                }
            }
            kind::SUBSCRIBE => {
                if let Ok((pkid, filters)) = codec::parse_subscribe(bytes, &frame) {
                    for f in &filters {
                        check_topic(Action::Subscribe, f.filter);
                    }
                    let refs: Vec<_> = filters.iter().collect();
                    let rewritten = codec::subscribe(pkid, &refs);
                    let again = codec::frame(&rewritten, usize::MAX).ok().flatten();
                    assert!(again.is_some(), "a SUBSCRIBE we write must frame");
                    let allowed: Vec<bool> =
                        filters.iter().map(|f| f.filter.len() % 2 == 0).collect();
                    let _ = codec::merge_suback(&allowed, &[0; 3]);
                }
            }
            kind::UNSUBSCRIBE => {
                let _ = codec::parse_unsubscribe(bytes, &frame);
            }
            kind::SUBACK => {
                let _ = codec::parse_suback(bytes, &frame);
            }
            _ => {
                let _ = codec::packet_id(bytes, frame.header_len);
            }
        }
        buf = &buf[frame.len..];
    }
});
