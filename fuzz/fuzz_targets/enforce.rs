//! The enforcement client's handling of messages from the decisions topic: any value and
//! headers, with signature verification on and off. Never a panic; with verification on,
//! nothing unsigned ever blocks anyone.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use rampart_enforce::Check;
use rampart_enforce::fuzzing::Receiver;
use rampart_enforce::signing::{Signer, Verifier};

#[derive(Arbitrary, Debug)]
struct Message {
    value: Vec<u8>,
    key_id: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
    /// Sign the value with the trusted key (else the headers are taken as they are).
    sign: bool,
    seconds: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    messages: Vec<Message>,
    actor: String,
    action: String,
}

fn keys() -> &'static (Signer, Verifier) {
    static KEYS: OnceLock<(Signer, Verifier)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = Signer::from_seed("k1", &[7; 32]).expect("key");
        let mut verifier = Verifier::new();
        verifier
            .trust_pem("k1", &signer.public_pem().expect("pem"))
            .expect("trusted");
        (signer, verifier)
    })
}

fuzz_target!(|input: Input| {
    let (signer, verifier) = keys();
    let start: DateTime<Utc> = DateTime::from_timestamp(1_767_225_600, 0).expect("time");
    let mut open = Receiver::new(None);
    let mut verifying = Receiver::new(Some(verifier.clone()));
    let mut signed_any = false;
    for m in &input.messages {
        let now = start + chrono::Duration::seconds(i64::from(m.seconds));
        let signature = m.sign.then(|| signer.sign(&m.value));
        let (key_id, sig) = match &signature {
            Some(s) => (Some(&b"k1"[..]), Some(s.as_bytes())),
            None => (m.key_id.as_deref(), m.signature.as_deref()),
        };
        signed_any |= m.sign;
        open.receive(&m.value, key_id, sig, now);
        verifying.receive(&m.value, key_id, sig, now);
        if m.seconds % 7 == 0 {
            open.prune(now);
            verifying.prune(now);
        }
    }
    let now = start + chrono::Duration::seconds(30);
    let _ = open.check(&input.actor, &input.action, now);
    let checked = verifying.check(&input.actor, &input.action, now);
    if !signed_any {
        assert_eq!(checked, Check::Allow, "only signed decisions may block");
    }
    let stats = verifying.stats();
    assert!(stats.unsigned + stats.bad_signatures <= stats.decisions);
});
