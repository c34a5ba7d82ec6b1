//! Resume tokens: where a subscriber stood in a feed, so that a stream cut
//! by the network continues with exactly the messages it missed.
//!
//! A token names the replica and the process that issued it, the query (a
//! hash of its canonical form), the feed instance, the feed version the
//! subscriber holds and the stream's sequence number, and carries a tag
//! keyed by a secret of the issuing process. Only a token this process
//! issued, untouched, is replayed from; anything else is refused (garbage,
//! another query, a tampered tag) or answered with a resync saying why (a
//! restarted server, another replica), so a forged token can never yield
//! wrong data.

use std::hash::{BuildHasher, RandomState};

use rtap::v1::ResyncReason;
use sha2::{Digest, Sha256};

use crate::error::{Error, FieldViolation};

/// The request field tokens come in.
pub(crate) const FIELD: &str = "resume_token";
/// The token layout's version (its first byte).
const LAYOUT: u8 = 1;
/// layout, replica, boot, query, feed, version, sequence, tag.
const LENGTH: usize = 1 + 8 + 8 + 16 + 8 + 8 + 8 + 8;

/// A query's identity across processes: the hash of its canonical form.
pub(crate) type QueryId = [u8; 16];

/// The identity of `canonical_key`.
pub(crate) fn query_id(canonical_key: &str) -> QueryId {
    let digest = Sha256::digest(canonical_key.as_bytes());
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// Where a stream stood after one of its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// The feed instance (a feed started again restarts its versions).
    pub(crate) feed: u64,
    /// The feed version the subscriber's result includes.
    pub(crate) version: u64,
    /// The stream's sequence number of that message.
    pub(crate) sequence: u64,
}

/// What a presented token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Continue from this position (if the feed still has what follows).
    Resume(Position),
    /// Start again from a snapshot marked `resync`, sequence numbers going
    /// on from `sequence`.
    Resync {
        /// Why.
        reason: ResyncReason,
        /// The token's sequence number.
        sequence: u64,
    },
}

/// Issues and reads the tokens of this process.
pub(crate) struct Tokens {
    /// The replica's stable name, hashed (`--replica-id`).
    replica: u64,
    /// This process's start: a token of an earlier one has no history here.
    boot: u64,
    /// The tag's key, secret to this process.
    key: RandomState,
}

impl Tokens {
    /// The tokens of the replica named `replica_id`.
    pub(crate) fn new(replica_id: &str) -> Self {
        let digest = Sha256::digest(replica_id.as_bytes());
        let mut replica = [0; 8];
        replica.copy_from_slice(&digest[..8]);
        Self {
            replica: u64::from_be_bytes(replica),
            boot: rand::random(),
            key: RandomState::new(),
        }
    }

    /// The token of `position` in a stream of `query`.
    pub(crate) fn issue(&self, query: &QueryId, position: Position) -> Vec<u8> {
        let mut token = Vec::with_capacity(LENGTH);
        token.push(LAYOUT);
        token.extend_from_slice(&self.replica.to_be_bytes());
        token.extend_from_slice(&self.boot.to_be_bytes());
        token.extend_from_slice(query);
        token.extend_from_slice(&position.feed.to_be_bytes());
        token.extend_from_slice(&position.version.to_be_bytes());
        token.extend_from_slice(&position.sequence.to_be_bytes());
        let tag = self.key.hash_one(&token[..]);
        token.extend_from_slice(&tag.to_be_bytes());
        token
    }

    /// What `token`, presented with a request for `query`, allows.
    pub(crate) fn read(&self, token: &[u8], query: &QueryId) -> Result<Verdict, Error> {
        let refuse = |why: &str| Error::InvalidArgument(vec![FieldViolation::new(FIELD, why)]);
        if token.len() != LENGTH || token[0] != LAYOUT {
            return Err(refuse(
                "is not a resume token of this API: send back the `resume_token` of a message, untouched",
            ));
        }
        let word = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&token[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        let (replica, boot) = (word(1), word(9));
        if token[17..33] != query[..] {
            return Err(refuse(
                "was issued for another query: resume with the query it came from, or start a new stream without a token",
            ));
        }
        let position = Position {
            feed: word(33),
            version: word(41),
            sequence: word(49),
        };
        let sequence = position.sequence;
        if replica != self.replica {
            return Ok(Verdict::Resync {
                reason: ResyncReason::OtherReplica,
                sequence,
            });
        }
        if boot != self.boot {
            return Ok(Verdict::Resync {
                reason: ResyncReason::ServerRestarted,
                sequence,
            });
        }
        if self.key.hash_one(&token[..57]) != word(57) {
            return Err(refuse("is corrupted: its tag does not match"));
        }
        Ok(Verdict::Resume(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSITION: Position = Position {
        feed: 7,
        version: 41,
        sequence: 99,
    };

    fn refused(result: Result<Verdict, Error>) -> String {
        match result {
            Err(Error::InvalidArgument(violations)) => {
                assert_eq!(violations[0].field, FIELD);
                violations[0].description.clone()
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_token_resumes_where_it_was_issued_and_nowhere_else() {
        let tokens = Tokens::new("replica-a");
        let query = query_id("event_counts:abc");
        let token = tokens.issue(&query, POSITION);
        assert_eq!(
            tokens.read(&token, &query).ok(),
            Some(Verdict::Resume(POSITION))
        );

        let other_query = query_id("event_counts:abd");
        assert!(refused(tokens.read(&token, &other_query)).contains("another query"));

        let restarted = Tokens::new("replica-a");
        assert_eq!(
            restarted.read(&token, &query).ok(),
            Some(Verdict::Resync {
                reason: ResyncReason::ServerRestarted,
                sequence: 99
            })
        );
        let other = Tokens::new("replica-b");
        assert_eq!(
            other.read(&token, &query).ok(),
            Some(Verdict::Resync {
                reason: ResyncReason::OtherReplica,
                sequence: 99
            })
        );
    }

    #[test]
    fn garbage_and_tampered_tokens_are_refused() {
        let tokens = Tokens::new("replica-a");
        let query = query_id("funnel:x");
        assert!(refused(tokens.read(b"", &query)).contains("not a resume token"));
        assert!(refused(tokens.read(&[1; LENGTH], &query)).contains("another query"));
        let mut token = tokens.issue(&query, POSITION);
        // A later version, as a forger would want.
        token[48] ^= 1;
        assert!(refused(tokens.read(&token, &query)).contains("corrupted"));
        let mut token = tokens.issue(&query, POSITION);
        token.push(0);
        assert!(refused(tokens.read(&token, &query)).contains("not a resume token"));
    }
}
