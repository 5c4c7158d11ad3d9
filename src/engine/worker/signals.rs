//! Ephemeral signals: typing, sealed and signed, over datagrams.

use super::*;

impl Worker {
    // ---- ephemeral signals -------------------------------------------------------------------

    /// Tells the other members' online devices whether this account is typing.
    pub(crate) fn typing(&mut self, c: &ConversationId, on: bool) -> Result<(), EngineError> {
        let group = DocAddr::Meta(*c).doc_id();
        let (epoch, key) = self
            .keyring
            .latest(&group)
            .map(|(e, k)| (e, k.clone()))
            .ok_or(EngineError::UnknownConversation(*c))?;
        let mut plain = Vec::with_capacity(TYPING_LEN);
        plain.extend_from_slice(c.as_bytes());
        plain.extend_from_slice(self.account().as_bytes());
        plain.push(u8::from(on));
        let header = EnvelopeHeader {
            kind: EnvelopeKind::Ephemeral,
            doc: group,
            epoch,
            author: self.device(),
            first_seq: 0,
            last_seq: 0,
        };
        let env = SealedEnvelope::seal(&self.secret, &key, header, &plain)?;
        let bytes = encode_datagram(&group, &env);
        if bytes.len() > MAX_DATAGRAM_BYTES {
            return Err(EngineError::Mismatch {
                what: "typing signal size",
            });
        }
        for r in self.live_relays() {
            if let Some(out) = &self.relays[r].out {
                let _ = out.send(Outgoing::Datagram(bytes.clone()));
            }
        }
        Ok(())
    }

    /// Handles a typing signal; false if it was dropped (malformed, forged, not a member).
    pub(super) fn on_datagram(&mut self, bytes: &[u8]) -> bool {
        let Ok((group, env)) = decode_datagram(bytes) else {
            return false;
        };
        if env.header.kind != EnvelopeKind::Ephemeral || env.header.doc != group {
            return false;
        }
        let keys = GroupKeys {
            keyring: &self.keyring,
            group,
        };
        let authorised = |author: &DeviceId, _: &DocId, _: KeyEpoch| self.may_write(author, &group);
        let Ok(opened) = env.open(&group, &keys, authorised) else {
            return false;
        };
        let p = &opened.plaintext;
        if p.len() != TYPING_LEN {
            return false;
        }
        let Ok(c) = <[u8; 16]>::try_from(&p[..16]) else {
            return false;
        };
        let Ok(a) = <[u8; 32]>::try_from(&p[16..48]) else {
            return false;
        };
        let conversation = ConversationId::from_bytes(c);
        let account = AccountId::from_bytes(a);
        // The signal must come from that account and be about this group.
        let from_account = self.accounts_of(&opened.header.author).contains(&account);
        if DocAddr::Meta(conversation).doc_id() != group || !from_account {
            return false;
        }
        if account != self.account() {
            self.emit(Event::Typing {
                conversation,
                account,
                typing: p[48] != 0,
            });
        }
        true
    }
}
