//! QUIC transport for shoal: one endpoint per node, mutual TLS, datagrams and framed messages over streams.
