//! RADIUS Change-of-Authorization and Disconnect transport (RFC 5176).
//!
//! A scheme renders one request per command in radclient's input style
//! (`coa User-Name = "u", Mikrotik-Rate-Limit = "10M/10M"`); `parse_request` turns it
//! into attributes with a FreeRADIUS-format `Dictionary`, and `RadiusClient` sends it
//! over UDP and maps the NAS's ACK / NAK to a `Verdict`.
//!
//! The packet codec is written here rather than taken from the `radius` crate (which
//! nasd does not depend on): that crate computes the request authenticator itself and
//! has no Message-Authenticator, while we need the RFC order "Message-Authenticator
//! first, then the authenticator over it" (checked byte for byte against `radclient`),
//! dictionary-driven vendor attributes loaded at run time, and the raw reply bytes to
//! verify. The codec is a few dozen lines; bending the crate's packet type around it
//! would not be.
//!
//! Every request carries a Message-Authenticator (BlastRADIUS, CVE-2024-3596). Replies
//! are accepted only from the NAS's address and port, with the identifier of a request
//! in flight and a valid response authenticator (and Message-Authenticator, if present);
//! anything else is logged at debug and ignored, so that a forged or stale datagram
//! cannot decide an event. The shared secret never leaves `send`: it is in no answer,
//! error, log line or `radclient_line`.
//!
//! Layers, each importing only those before it: `dictionary` (FreeRADIUS
//! dictionaries), `request` (the request text and its radclient line), `packet`
//! (encoding, signing, verifying, describing and classifying) and `client` (the UDP
//! socket and identifier demultiplexing). The RFC numbers they share are here.

mod client;
mod dictionary;
mod packet;
mod request;

pub use client::{RadiusClient, RadiusOptions};
pub use dictionary::{AttrDef, AttrType, Dictionary};
pub use packet::{
    VerifiedReply, classify, code_name, describe_reply, encode_request, verify_reply,
    verify_request,
};
pub use request::{Attribute, Request, RequestKind, Value, parse_request, radclient_line};

/// Code numbers of RFC 5176.
pub const DISCONNECT_REQUEST: u8 = 40;
pub const DISCONNECT_ACK: u8 = 41;
pub const DISCONNECT_NAK: u8 = 42;
pub const COA_REQUEST: u8 = 43;
pub const COA_ACK: u8 = 44;
pub const COA_NAK: u8 = 45;

/// RFC 5176 section 3: the default port. Many MikroTik and Cisco boxes use 1700.
pub const DEFAULT_COA_PORT: u16 = 3799;

const MESSAGE_AUTHENTICATOR: u8 = 80;
const ERROR_CAUSE: u8 = 101;
const VENDOR_SPECIFIC: u8 = 26;
const HEADER_LEN: usize = 20;
/// RFC 2865 section 3: the largest packet a RADIUS peer must accept.
const MAX_PACKET: usize = 4096;
