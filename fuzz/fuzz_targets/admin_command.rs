//! An admin command: the first byte picks the topic, the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onboard::admin;

const TOPICS: [&str; 7] = [
    "admin/devices/dev-1/config",
    "admin/devices/dev-1/rollback",
    "admin/devices/dev-1/firmware",
    "admin/devices/dev-1/revoke",
    "admin/devices/dev-1/reinstate",
    "admin/firmware",
    "admin/devices/dev-1/nothing",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let topic = TOPICS[usize::from(pick) % TOPICS.len()];
    let _ = admin::check_command(topic, payload);
    if let Ok(text) = std::str::from_utf8(payload) {
        let _ = admin::parse_topic(text);
    }
});
