//! SAS tokens checked against vectors computed outside this crate, with the Python SDK's
//! documented algorithm (`azure/iot/device/common/auth/sastoken.py`, `signing_mechanism.py`).
//!
//! The vectors were produced on this machine with:
//!
//! ```text
//! python3 -c '
//! import base64,hmac,hashlib,urllib.parse
//! key=base64.b64decode("c2VjcmV0LW1vZHVsZS1rZXktZm9yLXRlc3RzLTAxMjM0NTY3ODk=")
//! se=1900000000
//! def tok(sr):   # sr already URL-encoded, as it goes on the wire
//!     sig=base64.b64encode(hmac.new(key,(sr+"\n"+str(se)).encode(),hashlib.sha256).digest()).decode()
//!     return "SharedAccessSignature sr={}&sig={}&se={}".format(sr,urllib.parse.quote(sig,safe=""),se)
//! print(tok(urllib.parse.quote("acceptance-hub.local/devices/edgedev/modules/modA",safe="")))
//! print(tok("acceptance-hub.local%2fdevices%2fedgedev%2fmodules%2fmodA"))
//! print(tok(urllib.parse.quote("acceptance-hub.local/devices/edgedev",safe="")))'
//! ```

// Test helpers outside `#[test]` functions may panic too.
#![allow(clippy::unwrap_used)]

use hub::auth::sas::{self, ExpectedAudience, SasError, SasToken, CLOCK_SKEW_SECS};
use proptest::prelude::*;

/// base64 of `secret-module-key-for-tests-0123456789`.
const KEY_B64: &str = "c2VjcmV0LW1vZHVsZS1rZXktZm9yLXRlc3RzLTAxMjM0NTY3ODk=";
const SE: u64 = 1_900_000_000;
const MODULE_TOKEN: &str = "SharedAccessSignature sr=acceptance-hub.local%2Fdevices%2Fedgedev%2Fmodules%2FmodA&sig=827s%2B72GI5eaAptM8qUckfETyhmQJnp%2BWH5OUcIJ%2BrM%3D&se=1900000000";
/// Same resource, but the encoder wrote lower-case escapes: the signature covers them as sent.
const LOWER_ESCAPES_TOKEN: &str = "SharedAccessSignature sr=acceptance-hub.local%2fdevices%2fedgedev%2fmodules%2fmodA&sig=il0ZITEI5%2Be72Id8LgUu%2FDSbXpGpCIq048%2Bf5LU4aoE%3D&se=1900000000";
const DEVICE_TOKEN: &str = "SharedAccessSignature sr=acceptance-hub.local%2Fdevices%2Fedgedev&sig=BEPkHJLTe0M4fN5N9rsfsrOQu7Tral1MqRI2UIVfGA0%3D&se=1900000000";

const HOSTS: &[&str] = &["acceptance-hub.local", "edgehub.svc.cluster.local"];
const MOD_A: ExpectedAudience<'static> = ExpectedAudience {
    hosts: HOSTS,
    device: "edgedev",
    module: Some("modA"),
};

fn key() -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(KEY_B64)
        .unwrap()
}

#[test]
fn python_sdk_module_token_verifies() {
    let v = sas::verify(MODULE_TOKEN, &key(), &MOD_A, SE - 10).unwrap();
    assert_eq!(v.audience.host, "acceptance-hub.local");
    assert_eq!(v.audience.device, "edgedev");
    assert_eq!(v.audience.module.as_deref(), Some("modA"));
    assert_eq!(v.expiry, SE);
    assert_eq!(v.key_name, None);
}

#[test]
fn generate_reproduces_the_python_sdk_token_byte_for_byte() {
    let resource = sas::resource_uri("acceptance-hub.local", "edgedev", Some("modA"));
    assert_eq!(sas::generate(&resource, &key(), SE), MODULE_TOKEN);
    let resource = sas::resource_uri("acceptance-hub.local", "edgedev", None);
    assert_eq!(sas::generate(&resource, &key(), SE), DEVICE_TOKEN);
}

#[test]
fn signature_covers_sr_as_sent_including_escape_case() {
    assert!(sas::verify(LOWER_ESCAPES_TOKEN, &key(), &MOD_A, SE).is_ok());
    // The upper-case token's signature does not fit the lower-case `sr`.
    let swapped = LOWER_ESCAPES_TOKEN.replace(
        "il0ZITEI5%2Be72Id8LgUu%2FDSbXpGpCIq048%2Bf5LU4aoE%3D",
        "827s%2B72GI5eaAptM8qUckfETyhmQJnp%2BWH5OUcIJ%2BrM%3D",
    );
    assert_eq!(
        sas::verify(&swapped, &key(), &MOD_A, SE),
        Err(SasError::BadSignature)
    );
}

#[test]
fn fields_in_another_order_still_verify() {
    let t = "SharedAccessSignature se=1900000000&sig=827s%2B72GI5eaAptM8qUckfETyhmQJnp%2BWH5OUcIJ%2BrM%3D&sr=acceptance-hub.local%2Fdevices%2Fedgedev%2Fmodules%2FmodA";
    assert!(sas::verify(t, &key(), &MOD_A, SE).is_ok());
}

#[test]
fn tampered_signature_is_refused() {
    let t = MODULE_TOKEN.replace("sig=827s", "sig=927s");
    assert_eq!(
        sas::verify(&t, &key(), &MOD_A, SE),
        Err(SasError::BadSignature)
    );
}

#[test]
fn tampered_expiry_is_refused() {
    let t = MODULE_TOKEN.replace("se=1900000000", "se=1900003600");
    assert_eq!(
        sas::verify(&t, &key(), &MOD_A, SE),
        Err(SasError::BadSignature)
    );
}

#[test]
fn another_key_is_refused() {
    assert_eq!(
        sas::verify(MODULE_TOKEN, b"another key", &MOD_A, SE),
        Err(SasError::BadSignature)
    );
}

#[test]
fn expired_token_is_refused_after_the_skew() {
    assert!(sas::verify(MODULE_TOKEN, &key(), &MOD_A, SE + CLOCK_SKEW_SECS).is_ok());
    assert_eq!(
        sas::verify(MODULE_TOKEN, &key(), &MOD_A, SE + CLOCK_SKEW_SECS + 1),
        Err(SasError::Expired {
            expiry: SE,
            now: SE + CLOCK_SKEW_SECS + 1
        })
    );
}

#[test]
fn token_for_another_module_is_the_wrong_audience() {
    let mod_b = ExpectedAudience {
        module: Some("modB"),
        ..MOD_A
    };
    assert!(matches!(
        sas::verify(MODULE_TOKEN, &key(), &mod_b, SE),
        Err(SasError::WrongAudience(_))
    ));
}

#[test]
fn module_ids_are_compared_exactly() {
    let moda = ExpectedAudience {
        module: Some("moda"),
        ..MOD_A
    };
    assert!(matches!(
        sas::verify(MODULE_TOKEN, &key(), &moda, SE),
        Err(SasError::WrongAudience(_))
    ));
}

#[test]
fn device_token_is_refused_for_a_module_and_accepted_for_the_device() {
    assert!(matches!(
        sas::verify(DEVICE_TOKEN, &key(), &MOD_A, SE),
        Err(SasError::WrongAudience(_))
    ));
    let device = ExpectedAudience {
        module: None,
        ..MOD_A
    };
    assert!(sas::verify(DEVICE_TOKEN, &key(), &device, SE).is_ok());
    assert!(matches!(
        sas::verify(MODULE_TOKEN, &key(), &device, SE),
        Err(SasError::WrongAudience(_))
    ));
}

#[test]
fn unknown_host_is_the_wrong_audience() {
    let other = ExpectedAudience {
        hosts: &["other-hub.local"],
        ..MOD_A
    };
    assert!(matches!(
        sas::verify(MODULE_TOKEN, &key(), &other, SE),
        Err(SasError::WrongAudience(_))
    ));
}

#[test]
fn gateway_host_name_is_accepted_case_insensitively() {
    let resource = sas::resource_uri("EdgeHub.svc.cluster.local", "edgedev", Some("modA"));
    let t = sas::generate(&resource, &key(), SE);
    assert!(sas::verify(&t, &key(), &MOD_A, SE).is_ok());
}

#[test]
fn parse_exposes_the_string_to_sign() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    assert_eq!(
        t.string_to_sign(),
        "acceptance-hub.local%2Fdevices%2Fedgedev%2Fmodules%2FmodA\n1900000000"
    );
    assert_eq!(
        t.resource(),
        "acceptance-hub.local/devices/edgedev/modules/modA"
    );
}

proptest! {
    #[test]
    fn garbage_never_panics(s in ".*") {
        let _ = sas::verify(&s, b"k", &MOD_A, 0);
    }

    #[test]
    fn token_shaped_garbage_never_panics(
        fields in proptest::collection::vec("(sr|sig|se|skn|SR|x)?=?[A-Za-z0-9%+/=&. ]{0,12}", 0..6)
    ) {
        let t = format!("SharedAccessSignature {}", fields.join("&"));
        let _ = sas::verify(&t, b"k", &MOD_A, 0);
    }

    #[test]
    fn generated_tokens_verify_for_any_ids(
        device in "[A-Za-z0-9\\-.%_*?!(),:=@$']{1,20}",
        module in "[A-Za-z0-9\\-.%_*?!(),:=@$']{1,20}",
        key in proptest::collection::vec(any::<u8>(), 0..64),
        expiry in 0u64..u64::MAX / 2,
    ) {
        let resource = sas::resource_uri("hub.local", &device, Some(&module));
        let t = sas::generate(&resource, &key, expiry);
        let expected = ExpectedAudience { hosts: &["hub.local"], device: &device, module: Some(&module) };
        prop_assert!(sas::verify(&t, &key, &expected, expiry).is_ok());
    }
}
