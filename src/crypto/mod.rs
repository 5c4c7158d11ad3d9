//! End-to-end cryptography, sans-IO: no clock (callers pass `now_ms`) and no OS randomness
//! (callers pass a [`rng::SeedRng`] seeded from a CSPRNG).
//!
//! - [`identity`]: a device's ed25519 key (its `DeviceId`) and its signed X25519 key.
//! - [`device_log`]: the account's hash-chained, signed list of devices; the account id is the
//!   hash of its genesis entry.
//! - [`keys`]: per-document keys in numbered epochs, wrapped to member devices; rotation on
//!   removal.
//! - [`envelope`]: the sealed, signed, key-committed unit the relay stores.
//! - [`group`]: signed membership updates of a group (a conversation or an account), carrying
//!   wrapped keys.
//! - [`pairing`]: linking a new device with a short-lived code.
//!
//! Byte layouts are in `docs/PROTOCOL.md`, the threat model in `docs/SECURITY.md`.
//!
//! ```
//! use roamsync::crypto::device_log::DeviceLog;
//! use roamsync::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::keys::{KeyEpoch, Keyring};
//! use roamsync::crypto::rng::SeedRng;
//! use roamsync::ids::{DeviceId, DocAddr, DocId};
//!
//! let mut rng = SeedRng::from_seed([9; 32]); // from the OS in a real app
//! let phone = DeviceSecret::generate(&mut rng);
//! let log = DeviceLog::create(&phone, "phone", "android").unwrap();
//!
//! // The account document, encrypted for the account's devices.
//! let doc = DocAddr::Account(log.account()).doc_id();
//! let mut keys = Keyring::default();
//! let (epoch, _wrapped_for_others) = keys.rotate(doc, &[phone.public()], &mut rng).unwrap();
//! let header = EnvelopeHeader {
//!     kind: EnvelopeKind::Changes,
//!     doc,
//!     epoch,
//!     author: phone.device_id(),
//!     first_seq: 1,
//!     last_seq: 1,
//! };
//! let key = keys.key(&doc, epoch).unwrap();
//! let bytes = SealedEnvelope::seal(&phone, key, header, b"automerge changes").unwrap().encode();
//!
//! // Another device (or this one, later) checks and opens it.
//! let authorised = |d: &DeviceId, _: &DocId, _: KeyEpoch| log.is_current(d);
//! let opened = roamsync::crypto::envelope::open(&bytes, &doc, &keys, authorised).unwrap();
//! assert_eq!(opened.plaintext, b"automerge changes");
//! ```

pub mod device_log;
pub mod envelope;
pub mod group;
pub mod identity;
pub mod keys;
pub mod pairing;
pub mod rng;
