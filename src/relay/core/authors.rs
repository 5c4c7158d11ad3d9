//! Whose envelope an `Append` carries: the connection's device's own, or one it forwards for
//! another device (direct sync taught it the envelope, and it uploads it so the change survives
//! its author).
//!
//! Both are stored under their author: the dedup key, the routing metadata and the quota name
//! the header's author device and its account, never the connection that uploaded them. What
//! lets the relay take a forward is the signature, which it checks on every append: a forwarder
//! can hand over only bytes the author signed.

use crate::crypto::envelope::SealedEnvelope;
use crate::ids::{AccountId, DeviceId, DocId};

use super::{RelayCore, RequestError};

impl RelayCore {
    /// The account of the device that wrote `envelope`, appended to `group` by a connection of
    /// `device` authenticated for `account` (a member of `group`, checked by the caller).
    ///
    /// Its own envelope is its account's. A forwarded one must be by a device that a device
    /// log on this relay lists as current, for an account that is or was a member of `group`.
    /// Either way the signature must verify under the author's key.
    pub(super) fn append_author(
        &self,
        group: &DocId,
        device: DeviceId,
        account: AccountId,
        envelope: &SealedEnvelope,
    ) -> Result<AccountId, RequestError> {
        let author = envelope.header.author;
        let author_account = if author == device {
            account
        } else {
            self.forwarded_author_account(group, &author)?
        };
        check_signature(envelope)?;
        Ok(author_account)
    }

    /// The account a forwarded envelope by `author` is stored under.
    ///
    /// A revoked device is refused even though what it signed before its revocation is part of
    /// history: nothing in an envelope or in the relay's state tells when it was signed, and a
    /// revoked device's key is the one to assume stolen (see `docs/SECURITY.md`). A device
    /// several logs list (a log may list another account's device, whose keys are public) is
    /// stored under one of its accounts that is a member of `group` now if there is one, else
    /// one that was; the lowest id among equals, so the choice does not depend on order.
    fn forwarded_author_account(
        &self,
        group: &DocId,
        author: &DeviceId,
    ) -> Result<AccountId, RequestError> {
        let listed = self
            .device_accounts
            .get(author)
            .ok_or(RequestError::UnknownAuthor { author: *author })?;
        let current: Vec<AccountId> = listed
            .iter()
            .copied()
            .filter(|a| {
                self.accounts
                    .get(a)
                    .is_some_and(|log| log.is_current(author))
            })
            .collect();
        if current.is_empty() {
            return Err(RequestError::AuthorRevoked { author: *author });
        }
        let chain = self.groups.get(group);
        current
            .iter()
            .find(|a| chain.is_some_and(|c| c.latest().is_member(a)))
            .or_else(|| {
                current
                    .iter()
                    .find(|a| chain.is_some_and(|c| c.was_member(a)))
            })
            .copied()
            .ok_or(RequestError::AuthorNotMember {
                author: *author,
                group: *group,
            })
    }
}

/// Checks the envelope's signature under its header's author key. No key is needed; whether
/// the author may write is for the caller to decide.
fn check_signature(envelope: &SealedEnvelope) -> Result<(), RequestError> {
    envelope
        .verify_signature()
        .map_err(|source| RequestError::BadSignature {
            doc: envelope.header.doc,
            source,
        })
}
