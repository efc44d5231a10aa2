//! The payload a bootstrap device publishes on `enroll/D/request`: every check that runs
//! before the store or the PKI is asked.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use onboard::config::EnrollmentConfig;
use onboard::enroll;
use onboard::templates::Templates;

fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/templates");
        Templates::load(&dir).expect("the shipped templates load")
    })
}

fuzz_target!(|data: &[u8]| {
    let config = EnrollmentConfig::default();
    if let Err(rejection) = enroll::check_request(data, &config, templates()) {
        assert!(!rejection.code.as_str().is_empty());
    }
});
