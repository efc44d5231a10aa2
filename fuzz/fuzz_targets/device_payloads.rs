//! What an enrolled device publishes to the gateway: `devices/D/config/ack`,
//! `devices/D/firmware/status` and `devices/D/cert/renew` (whose CSR is then checked).
#![no_main]

use libfuzzer_sys::fuzz_target;
use onboard::admin::config::ConfigAck;
use onboard::admin::firmware::{is_terminal, FirmwareStatus};
use onboard::admin::renew::RenewRequest;
use onboard::admin::usable_request_id;
use onboard::pki::Pki;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ConfigAck>(data);
    if let Ok(status) = serde_json::from_slice::<FirmwareStatus>(data) {
        let _ = is_terminal(&status.status);
    }
    if let Ok(renew) = serde_json::from_slice::<RenewRequest>(data) {
        if usable_request_id(&renew.request_id) {
            let _ = Pki::check_csr("dev-1", &renew.csr);
        }
    }
});
