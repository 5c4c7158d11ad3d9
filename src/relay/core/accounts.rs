//! Accounts: `Hello` (authentication), `LogAppend` (creating and extending device logs, with
//! revocation) and `FetchLog`.

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry, EntryAction, EntryHash};
use crate::ids::{AccountId, DeviceId};
use crate::wire::frame::ErrorCode;
use crate::wire::message::{MAX_GROUPS_PER_HELLO, Message};

use super::{AuthRefusal, ConnId, Output, PersistOp, RelayCore, RelayEvent, RequestError};

impl RelayCore {
    /// `Hello`: binds the connection to `account` and authenticates it if its device is current
    /// in the relay's log of that account. A revoked device is answered with an error and closed.
    pub(super) fn handle_hello(
        &mut self,
        conn: ConnId,
        req: u32,
        account: AccountId,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let Some(c) = self.conns.get(&conn) else {
            return Ok(());
        };
        let device = c.device;
        if let Some(bound) = c.account {
            if bound != account && c.authenticated {
                return Err(RequestError::AccountMismatch {
                    bound,
                    claimed: account,
                });
            }
        }
        let log = self.accounts.get(&account);
        let (log_len, log_head) = log_position(log);
        let refusal = match log {
            None => Some(AuthRefusal::UnknownAccount),
            Some(log) if log.is_current(&device) => None,
            Some(log) if log.device(&device).is_some() => Some(AuthRefusal::Revoked),
            Some(_) => Some(AuthRefusal::NotInLog),
        };
        out.push(Output::Event(match refusal {
            None => RelayEvent::Authenticated {
                conn,
                device,
                account,
            },
            Some(reason) => RelayEvent::AuthRefused {
                conn,
                device,
                account,
                reason,
            },
        }));
        if refusal == Some(AuthRefusal::Revoked) {
            out.extend(self.close_outputs(
                conn,
                ErrorCode::UNAUTHORISED,
                revoked_text(&device, &account),
            ));
            return Ok(());
        }
        self.bind_account(conn, account);
        let authenticated = refusal.is_none();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.authenticated = authenticated;
        }
        // Group membership is only revealed to the account's own devices.
        let groups = if authenticated {
            self.member_groups(&account)
        } else {
            Vec::new()
        };
        out.push(Output::Send {
            conn,
            msg: Message::HelloOk {
                req,
                log_len,
                log_head,
                groups,
            },
        });
        Ok(())
    }

    /// Moves `conn` to `account` in the account index.
    fn bind_account(&mut self, conn: ConnId, account: AccountId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(old) = c.account.replace(account) {
            if old != account {
                super::remove_from_index(&mut self.by_account, &old, &conn);
            }
        }
        self.by_account.entry(account).or_default().insert(conn);
    }

    /// Groups whose latest members include `account`, with their latest version.
    fn member_groups(&self, account: &AccountId) -> Vec<(crate::ids::DocId, u32)> {
        self.member_of
            .get(account)
            .into_iter()
            .flatten()
            .filter_map(|g| self.groups.get(g).map(|c| (*g, c.latest().version)))
            .take(MAX_GROUPS_PER_HELLO)
            .collect()
    }

    /// `LogAppend`: creates an account from its genesis or extends its log. Entries the relay
    /// holds already are fine; a fork is refused. New entries are persisted, then confirmed,
    /// pushed to the account's other connections and acted on (revoked devices are closed,
    /// connections of added devices become authenticated).
    pub(super) fn handle_log_append(
        &mut self,
        conn: ConnId,
        req: u32,
        account: AccountId,
        first_seq: u32,
        entries: Vec<DeviceLogEntry>,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        for (index, entry) in entries.iter().enumerate() {
            let expected = u64::from(first_seq) + index as u64;
            if u64::from(entry.seq) != expected {
                return Err(RequestError::LogPosition {
                    first_seq,
                    index,
                    expected,
                    found: entry.seq,
                });
            }
        }
        let log_err = |source| RequestError::Log { account, source };
        let (old_len, log) = match self.accounts.get(&account) {
            None => {
                if first_seq != 0 {
                    return Err(RequestError::UnknownAccount { account });
                }
                let max = self.limits.max_new_accounts_per_conn;
                if self.conns.get(&conn).is_some_and(|c| c.new_accounts >= max) {
                    return Err(RequestError::TooManyNewAccounts { max });
                }
                (0, DeviceLog::verify(&account, entries).map_err(log_err)?)
            }
            Some(existing) => {
                let mut log = existing.clone();
                for entry in entries {
                    log.append(entry).map_err(log_err)?;
                }
                (existing.len(), log)
            }
        };
        let new_entries = log.entries()[old_len..].to_vec();
        if new_entries.is_empty() {
            out.push(Output::Send {
                conn,
                msg: Message::Done { req },
            });
            return Ok(());
        }
        if old_len == 0 {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.new_accounts += 1;
            }
            out.push(Output::Event(RelayEvent::AccountCreated { account }));
        }
        self.index_devices(account, &new_entries);
        self.accounts.insert(account, log);
        let mut then = vec![Output::Send {
            conn,
            msg: Message::Done { req },
        }];
        let closed = self.reauthenticate(account, out);
        // `old_len` is at most MAX_LOG_ENTRIES, which fits in a u32.
        let first_new = old_len as u32;
        for other in self.authenticated_conns(&account).collect::<Vec<_>>() {
            if other != conn {
                then.push(Output::Push {
                    conn: other,
                    msg: Message::LogEntries {
                        req: 0,
                        account,
                        first_seq: first_new,
                        entries: new_entries.clone(),
                    },
                });
            }
        }
        for (id, device) in &closed {
            then.extend(self.close_outputs(
                *id,
                ErrorCode::UNAUTHORISED,
                revoked_text(device, &account),
            ));
        }
        for entry in &new_entries {
            if let EntryAction::Revoke(device) = &entry.action {
                let closed = closed.iter().filter(|(_, d)| d == device).count();
                out.push(Output::Event(RelayEvent::DeviceRevoked {
                    account,
                    device: *device,
                    closed,
                }));
            }
        }
        out.push(Output::Persist {
            op: PersistOp::AppendLog {
                account,
                first_seq: first_new,
                entries: new_entries.iter().map(DeviceLogEntry::encode).collect(),
            },
            then,
        });
        Ok(())
    }

    /// Re-checks every connection that claimed `account` against its (changed) log:
    /// connections of newly added devices become authenticated. Returns the connections of
    /// revoked devices, which the caller closes once the revocation is durable; they are no
    /// longer authenticated from now on.
    fn reauthenticate(
        &mut self,
        account: AccountId,
        out: &mut Vec<Output>,
    ) -> Vec<(ConnId, DeviceId)> {
        let Some(log) = self.accounts.get(&account) else {
            return Vec::new();
        };
        let mut revoked = Vec::new();
        let mut added = Vec::new();
        for id in self.by_account.get(&account).into_iter().flatten() {
            let Some(c) = self.conns.get(id) else {
                continue;
            };
            if c.closing {
                continue;
            }
            if log.is_current(&c.device) {
                if !c.authenticated {
                    added.push((*id, c.device));
                }
            } else if log.device(&c.device).is_some() {
                revoked.push((*id, c.device));
            }
        }
        for (id, device) in added {
            if let Some(c) = self.conns.get_mut(&id) {
                c.authenticated = true;
            }
            out.push(Output::Event(RelayEvent::Authenticated {
                conn: id,
                device,
                account,
            }));
        }
        for (id, _) in &revoked {
            if let Some(c) = self.conns.get_mut(id) {
                c.authenticated = false;
            }
        }
        revoked
    }

    /// `FetchLog`: the relay's entries of `account` from `from_seq` (none if it has no log).
    pub(super) fn handle_fetch_log(
        &mut self,
        conn: ConnId,
        req: u32,
        account: AccountId,
        from_seq: u32,
        out: &mut Vec<Output>,
    ) {
        let entries = self
            .accounts
            .get(&account)
            .and_then(|log| log.entries().get(from_seq as usize..))
            .map(<[DeviceLogEntry]>::to_vec)
            .unwrap_or_default();
        out.push(Output::Send {
            conn,
            msg: Message::LogEntries {
                req,
                account,
                first_seq: from_seq,
                entries,
            },
        });
    }
}

/// The relay's length and head of a log (zero hash if it has none).
fn log_position(log: Option<&DeviceLog>) -> (u32, EntryHash) {
    match log {
        // A log holds at most MAX_LOG_ENTRIES, which fits in a u32.
        Some(log) => (log.len() as u32, log.head()),
        None => (0, EntryHash([0; 32])),
    }
}

fn revoked_text(device: &DeviceId, account: &AccountId) -> String {
    format!("device revoked: device {device} was revoked from account {account}")
}
