//! A bulk-import CSV file as an operator hands it to `onboard devices import`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use onboard::config::PkiConfig;
use onboard::import::{parse_rows, RowRules};
use regex::Regex;

fn pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        Regex::new(&PkiConfig::default().device_id_pattern).expect("default pattern")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let types = ["thermostat".to_string(), "sensor".to_string()];
    for device_types in [None, Some(&types[..])] {
        let rules = RowRules {
            device_id_pattern: pattern(),
            device_types,
        };
        let (devices, errors) = parse_rows(text, &rules);
        for d in &devices {
            assert!(
                pattern().is_match(&d.id),
                "an imported id matches the pattern"
            );
        }
        let _ = errors.len();
    }
});
