//! Node names and peer addresses.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::TrustError;

/// Longest node name accepted, in bytes (the limit of a DNS name).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// The name of a node within its cluster, as written in its certificate.
///
/// A node name is a lowercase DNS-style name (`node-1`, `db7.rack3`): labels of
/// `a-z`, `0-9` and `-` (not at either end of a label), 1 to 63 bytes each,
/// separated by dots, at most [`MAX_NODE_NAME_LEN`] bytes, and not an IP
/// address. Uppercase is refused rather than folded, so a name has exactly one
/// spelling. The name is the certificate's DNS subject alternative name, which
/// is what lets the peer check it during the TLS handshake.
///
/// Cloning is cheap (the text is shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(Arc<str>);

impl NodeName {
    /// Checks and wraps a node name.
    ///
    /// # Errors
    /// [`TrustError::InvalidName`] when `name` breaks a rule above.
    pub fn new(name: &str) -> Result<Self, TrustError> {
        validate(name).map_err(|reason| TrustError::InvalidName {
            name: name.chars().take(MAX_NODE_NAME_LEN + 3).collect(),
            reason,
        })?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err("longer than 253 bytes");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("an IP address is not a node name");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (leading, trailing or double dot)");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 bytes");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only a-z, 0-9, '-' and '.' are allowed");
        }
    }
    // All-numeric last label would make some parsers read an IPv4 address.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label must not be all digits");
    }
    Ok(())
}

impl FromStr for NodeName {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A remote node whose identity the transport has verified: the name in its
/// certificate (checked against the cluster CA) and the address it speaks from.
///
/// Every datagram and message the transport delivers carries one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The node's name, from its certificate.
    pub name: NodeName,
    /// The node's UDP address (its listening address: a node uses one socket).
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// Where to send: an address, and the node expected there when it is known.
///
/// With a name, the peer's certificate must name that node (a known member).
/// Without one (a join seed, say), any node certified by the cluster CA is
/// accepted and its name is reported in the [`Peer`] the transport returns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    /// The peer's UDP address.
    pub addr: SocketAddr,
    /// The node expected at `addr`, if known.
    pub name: Option<NodeName>,
}

impl Dest {
    /// A known node at a known address.
    pub fn node(name: NodeName, addr: SocketAddr) -> Self {
        Self {
            addr,
            name: Some(name),
        }
    }

    /// Whatever cluster node answers at `addr`.
    pub fn addr(addr: SocketAddr) -> Self {
        Self { addr, name: None }
    }
}

impl From<Peer> for Dest {
    fn from(peer: Peer) -> Self {
        Self::node(peer.name, peer.addr)
    }
}

impl From<&Peer> for Dest {
    fn from(peer: &Peer) -> Self {
        Self::node(peer.name.clone(), peer.addr)
    }
}

impl From<SocketAddr> for Dest {
    fn from(addr: SocketAddr) -> Self {
        Self::addr(addr)
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}@{}", self.addr),
            None => write!(f, "?@{}", self.addr),
        }
    }
}

/// Maps an IPv4-mapped IPv6 address to plain IPv4 so one peer has one key.
pub(crate) fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_style_names() {
        for ok in ["a", "node-1", "db7.rack3", "x1", "n0.c0.example", "1a"] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        let long = "a".repeat(254);
        let long_label = "a".repeat(64);
        for bad in [
            "",
            "Node",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a_b",
            "10.0.0.1",
            "::1",
            "a.123",
            "é",
            long.as_str(),
            long_label.as_str(),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dest_display_says_which_peer() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let name = NodeName::new("n1").unwrap();
        assert_eq!(Dest::node(name, addr).to_string(), "n1@127.0.0.1:7000");
        assert_eq!(Dest::addr(addr).to_string(), "?@127.0.0.1:7000");
    }
}
