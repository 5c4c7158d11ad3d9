//! Pairing rendezvous: the relay forwards a joining device's request to the inviting device and
//! the answer back, matching them by a rendezvous id both derive from the pairing code. It
//! learns nothing else: the messages are authenticated by the code, which it never sees.

use crate::crypto::pairing::{MAX_PAIRING_TTL_MS, PairRequest, PairResponse};
use crate::relay::limits::MAX_PAIRING_OFFERS_PER_CONN;
use crate::wire::message::{Message, RENDEZVOUS_LEN};

use super::{ConnId, Output, RelayCore, Rendezvous, RequestError};

type RendezvousId = [u8; RENDEZVOUS_LEN];

impl RelayCore {
    /// `PairOffer`: registers this (authenticated) connection as the inviter of `rendezvous`
    /// for [`MAX_PAIRING_TTL_MS`]. Offering again refreshes the expiry.
    pub(super) fn handle_pair_offer(
        &mut self,
        conn: ConnId,
        req: u32,
        rendezvous: RendezvousId,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        self.authenticated(conn, "PairOffer")?;
        self.expire_rendezvous_if(&rendezvous, now_ms);
        let expires_ms = now_ms.saturating_add(MAX_PAIRING_TTL_MS);
        match self.rendezvous.get_mut(&rendezvous) {
            Some(r) if r.inviter == conn => r.expires_ms = expires_ms,
            Some(_) => return Err(RequestError::RendezvousTaken),
            None => {
                let offered = self.conns.get(&conn).map_or(0, |c| c.offered.len());
                if offered >= MAX_PAIRING_OFFERS_PER_CONN {
                    return Err(RequestError::TooManyOffers {
                        max: MAX_PAIRING_OFFERS_PER_CONN,
                    });
                }
                if self.rendezvous.len() >= self.limits.max_pairing_offers {
                    self.expire_all_rendezvous(now_ms);
                }
                if self.rendezvous.len() >= self.limits.max_pairing_offers {
                    return Err(RequestError::TooManyOffers {
                        max: self.limits.max_pairing_offers,
                    });
                }
                self.rendezvous.insert(
                    rendezvous,
                    Rendezvous {
                        inviter: conn,
                        joiner: None,
                        expires_ms,
                    },
                );
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.offered.insert(rendezvous);
                }
            }
        }
        out.push(Output::Send {
            conn,
            msg: Message::Done { req },
        });
        Ok(())
    }

    /// `PairJoin`: forwards the joiner's request to the inviter as `PairRequested` and
    /// remembers the joiner. Allowed before authentication: the joiner has no account yet.
    pub(super) fn handle_pair_join(
        &mut self,
        conn: ConnId,
        req: u32,
        rendezvous: RendezvousId,
        request: PairRequest,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        self.expire_rendezvous_if(&rendezvous, now_ms);
        let r = self
            .rendezvous
            .get_mut(&rendezvous)
            .ok_or(RequestError::UnknownRendezvous)?;
        if r.inviter == conn {
            return Err(RequestError::UnknownRendezvous);
        }
        match r.joiner {
            Some(j) if j != conn => return Err(RequestError::RendezvousJoined),
            _ => r.joiner = Some(conn),
        }
        let inviter = r.inviter;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined.insert(rendezvous);
        }
        out.push(Output::Send {
            conn: inviter,
            msg: Message::PairRequested {
                rendezvous,
                request,
            },
        });
        out.push(Output::Send {
            conn,
            msg: Message::Done { req },
        });
        Ok(())
    }

    /// `PairAnswer`: from the inviter only; forwards the response to the joiner as
    /// `PairAnswered` and ends the rendezvous.
    pub(super) fn handle_pair_answer(
        &mut self,
        conn: ConnId,
        req: u32,
        rendezvous: RendezvousId,
        response: PairResponse,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        self.expire_rendezvous_if(&rendezvous, now_ms);
        let r = self
            .rendezvous
            .get(&rendezvous)
            .ok_or(RequestError::UnknownRendezvous)?;
        if r.inviter != conn {
            return Err(RequestError::NotInviter);
        }
        let joiner = r.joiner.ok_or(RequestError::NoJoiner)?;
        self.remove_rendezvous(&rendezvous);
        out.push(Output::Send {
            conn: joiner,
            msg: Message::PairAnswered {
                rendezvous,
                response,
            },
        });
        out.push(Output::Send {
            conn,
            msg: Message::Done { req },
        });
        Ok(())
    }

    /// Removes a rendezvous and forgets it on both connections.
    pub(super) fn remove_rendezvous(&mut self, id: &RendezvousId) {
        let Some(r) = self.rendezvous.remove(id) else {
            return;
        };
        for conn in std::iter::once(r.inviter).chain(r.joiner) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.offered.remove(id);
                c.joined.remove(id);
            }
        }
    }

    fn expire_rendezvous_if(&mut self, id: &RendezvousId, now_ms: u64) {
        if self
            .rendezvous
            .get(id)
            .is_some_and(|r| r.expires_ms <= now_ms)
        {
            self.remove_rendezvous(id);
        }
    }

    fn expire_all_rendezvous(&mut self, now_ms: u64) {
        let expired: Vec<RendezvousId> = self
            .rendezvous
            .iter()
            .filter(|(_, r)| r.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove_rendezvous(&id);
        }
    }
}
