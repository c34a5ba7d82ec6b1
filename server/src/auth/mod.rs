//! Who may call what: API keys (in PostgreSQL, cached in the server), the
//! roles they carry, and the gate that checks every call before routing.
//!
//! - [`key`]: the text of a key, its generation and hashing;
//! - [`policy`]: the one table of RPC → role;
//! - [`registry`]: keys in PostgreSQL (`rtap-server keys`);
//! - [`cache`]: the server's copy of the live keys, reloaded every few
//!   seconds (how long a revoked key keeps working);
//! - [`layer`]: the tower layer in front of every service;
//! - [`limits`]: how often and how much each caller may call;
//! - [`manage`]: `rtap-server keys`.

use std::sync::Arc;

mod cache;
mod key;
mod layer;
mod limits;
mod manage;
pub mod policy;
mod registry;

pub(crate) use cache::{KeyCache, keep_fresh};
pub(crate) use layer::{AuthLayer, Gate};
pub(crate) use limits::StreamSlots;
pub use limits::{LimitSettings, Limits};
pub use manage::{KeysAction, run as manage_keys};
pub use policy::{AccessRole, OpenService};

/// Who calls, as limits count: the key's name, or without a key the
/// client's IP address. Every call the gate admits carries one in its
/// request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `key:<name>` or `ip:<address>`.
    pub id: Arc<str>,
}

impl Caller {
    /// The caller of `request`, as the gate recorded it.
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self {
                id: "ip:unknown".into(),
            })
    }
}

/// Who made a call: the name and role of the key it presented. Handlers
/// find it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name.
    pub name: Arc<str>,
    /// What the key may do.
    pub role: AccessRole,
    /// The key's public id (never its secret).
    pub key_id: Arc<str>,
    /// `key:<name>`: who the limits count, made once per key rather than
    /// per call.
    pub caller_id: Arc<str>,
}
