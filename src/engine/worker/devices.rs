//! Device logs (this account's and other members'), linking a new device, revocation.

use super::*;

impl Worker {
    // ---- device logs -------------------------------------------------------------------------

    pub(super) fn on_log_entries(
        &mut self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<crate::crypto::device_log::DeviceLogEntry>,
    ) -> Result<(), EngineError> {
        if entries.is_empty() {
            self.wake_log_waiters(&account);
            return Ok(());
        }
        let revokes = entries
            .iter()
            .any(|e| matches!(e.action, crate::crypto::device_log::EntryAction::Revoke(_)));
        self.absorb_log_entries(account, first_seq, entries)?;
        if revokes {
            self.rewrap_after_revocation(account)?;
        }
        Ok(())
    }

    fn absorb_log_entries(
        &mut self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<crate::crypto::device_log::DeviceLogEntry>,
    ) -> Result<(), EngineError> {
        if account == self.account() {
            let before: HashSet<DeviceId> = self
                .log
                .current_devices()
                .map(|d| d.info.keys.device)
                .collect();
            for e in entries {
                self.log.append(e)?;
            }
            let log = self.log.clone();
            self.replica.store().write(|tx| tx.put_device_log(&log))?;
            let after: HashSet<DeviceId> = self
                .log
                .current_devices()
                .map(|d| d.info.keys.device)
                .collect();
            for d in after.difference(&before) {
                self.emit(Event::DeviceLinked { device: *d });
            }
            for d in before.difference(&after) {
                self.emit(Event::DeviceRevoked { device: *d });
            }
            self.share_own_log();
            self.drop_revoked_peers();
            if !self.log.is_current(&self.device()) {
                tracing::warn!("this device was revoked");
            }
        } else if first_seq == 0 && !self.logs.contains_key(&account) {
            let log = match self.logs.remove(&account) {
                Some(mut known) => {
                    for e in entries {
                        known.append(e)?;
                    }
                    known
                }
                None => DeviceLog::verify(&account, entries)?,
            };
            self.logs.insert(account, log);
        } else if let Some(known) = self.logs.get_mut(&account) {
            for e in entries {
                known.append(e)?;
            }
        } else {
            self.wake_log_waiters(&account);
            return Ok(());
        }
        self.index_devices();
        let blob = state::encode_logs(&self.logs);
        self.replica
            .store()
            .write(|tx| tx.put_setting(state::LOGS_SETTING, &blob))?;
        self.wake_log_waiters(&account);
        Ok(())
    }

    /// Asks the relays for the device logs of `accounts` this device lacks; `done` fires once
    /// all are known, or with an error if no relay is connected.
    pub(crate) fn fetch_logs(
        &mut self,
        accounts: Vec<AccountId>,
        done: oneshot::Sender<Result<(), EngineError>>,
    ) {
        // Known logs are refreshed too: a device added since they were fetched must get keys.
        let mut asked: Vec<AccountId> = accounts
            .into_iter()
            .filter(|a| *a != self.account())
            .collect();
        asked.sort();
        asked.dedup();
        if asked.is_empty() {
            let _ = done.send(Ok(()));
            return;
        }
        let live = self.live_relays();
        let Some(relay) = live.first().copied() else {
            // With no relay, logs held here do (a direct peer's was refreshed by its hello);
            // a device added since then gets the keys with the next membership change.
            let known = asked.iter().all(|a| self.logs.contains_key(a));
            let _ = done.send(if known {
                Ok(())
            } else {
                Err(EngineError::Offline)
            });
            return;
        };
        for account in &asked {
            let account = *account;
            let from_seq = self.logs.get(&account).map_or(0, |l| l.len() as u32);
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq,
            });
        }
        self.log_waiters.push(LogWaiter {
            accounts: asked.clone(),
            asked,
            done,
        });
    }

    pub(super) fn wake_log_waiters(&mut self, answered: &AccountId) {
        let waiters = std::mem::take(&mut self.log_waiters);
        for mut w in waiters {
            w.accounts.retain(|a| a != answered);
            if !w.accounts.is_empty() {
                self.log_waiters.push(w);
                continue;
            }
            let result = match w.asked.iter().find(|a| !self.logs.contains_key(a)) {
                Some(a) => Err(EngineError::UnknownAccount(*a)),
                None => Ok(()),
            };
            let _ = w.done.send(result);
        }
    }

    pub(super) fn fail_log_waiters(&mut self, account: &AccountId, code: ErrorCode, text: &str) {
        let waiters = std::mem::take(&mut self.log_waiters);
        for w in waiters {
            if w.accounts.contains(account) {
                let _ = w.done.send(Err(EngineError::Relay {
                    code,
                    text: text.to_owned(),
                }));
            } else {
                self.log_waiters.push(w);
            }
        }
    }

    /// Current devices of `accounts` (this account's from its own log).
    pub(super) fn current_devices(
        &self,
        accounts: &[AccountId],
    ) -> Result<Vec<DevicePublic>, EngineError> {
        let mut out = Vec::new();
        for a in accounts {
            let log = if *a == self.account() {
                &self.log
            } else {
                self.logs.get(a).ok_or(EngineError::UnknownAccount(*a))?
            };
            out.extend(log.current_devices().map(|d| d.info.keys));
        }
        Ok(out)
    }

    // ---- linking and revocation --------------------------------------------------------------

    /// Starts a device-link invitation on the first connected relay; `done` gets the code once
    /// the relay has registered the offer (a joiner that came sooner would be refused).
    pub(crate) fn invite(&mut self, done: CodeReply) {
        let Some(relay) = self.live_relays().first().copied() else {
            let _ = done.send(Err(EngineError::Offline));
            return;
        };
        let invite = match PairingInvite::new(&mut self.rng, now_ms(), INVITE_TTL_MS) {
            Ok(i) => i,
            Err(e) => {
                let _ = done.send(Err(e.into()));
                return;
            }
        };
        let code = invite.code();
        let rendezvous = invite.rendezvous();
        self.invites.insert(rendezvous, invite);
        self.offers.insert(rendezvous, (code, done));
        self.request(relay, Pending::PairOffer(rendezvous), |req| {
            Message::PairOffer { req, rendezvous }
        });
    }

    pub(super) fn on_pair_requested(
        &mut self,
        relay: usize,
        rendezvous: [u8; 32],
        request: crate::crypto::pairing::PairRequest,
    ) -> Result<(), EngineError> {
        if !self.invites.contains_key(&rendezvous) {
            return Ok(());
        }
        let response = self.answer_pairing(rendezvous, &request)?;
        self.request(relay, Pending::PairAnswer, |req| Message::PairAnswer {
            req,
            rendezvous,
            response,
        });
        Ok(())
    }

    /// Answers a joiner of the invitation at `rendezvous` (through a relay or directly): adds
    /// its device to this account's log, tells relays and peers, and returns the response that
    /// carries the log and every key.
    pub(super) fn answer_pairing(
        &mut self,
        rendezvous: [u8; 32],
        request: &crate::crypto::pairing::PairRequest,
    ) -> Result<crate::crypto::pairing::PairResponse, EngineError> {
        let invite = self
            .invites
            .get_mut(&rendezvous)
            .ok_or(EngineError::Mismatch {
                what: "the pairing rendezvous and an open invitation",
            })?;
        let before = self.log.len() as u32;
        let response = invite.handle_request(
            request,
            now_ms(),
            &self.secret,
            &mut self.log,
            &self.keyring,
            &mut self.rng,
        )?;
        self.invites.remove(&rendezvous);
        let log = self.log.clone();
        self.replica.store().write(|tx| tx.put_device_log(&log))?;
        self.index_devices();
        let entries = self.log.entries()[before as usize..].to_vec();
        let account = self.account();
        for r in self.live_relays() {
            let entries = entries.clone();
            self.request(r, Pending::LogAppend, |req| Message::LogAppend {
                req,
                account,
                first_seq: before,
                entries,
            });
        }
        self.share_own_log();
        self.emit(Event::DeviceLinked {
            device: request.device.device,
        });
        Ok(response)
    }

    /// Revokes a device of this account and tells the relays, which refuse it at once.
    pub(crate) fn revoke(&mut self, device: DeviceId) -> Result<(), EngineError> {
        let before = self.log.len() as u32;
        let entry = self.log.revoke_device(&self.secret, device)?;
        self.log.append(entry.clone())?;
        let log = self.log.clone();
        self.replica.store().write(|tx| tx.put_device_log(&log))?;
        let account = self.account();
        for r in self.live_relays() {
            let entries = vec![entry.clone()];
            self.request(r, Pending::LogAppend, |req| Message::LogAppend {
                req,
                account,
                first_seq: before,
                entries,
            });
        }
        self.emit(Event::DeviceRevoked { device });
        self.share_own_log();
        self.drop_revoked_peers();
        self.rewrap_after_revocation(account)
    }
}
