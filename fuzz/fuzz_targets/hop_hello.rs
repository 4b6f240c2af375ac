//! The chain hop preamble (`tube_proto::chain::decode_hop_hello`): the input is the first bytes
//! a dialing node sends.
//!
//! - Decoding never panics, and its answer is exactly: `BadMagic` when the bytes seen so far
//!   disagree with `TBH1`; `Ok(None)` when they agree but fewer than `HOP_HELLO_LEN` arrived;
//!   otherwise the tunnel id and secret, whose `encode_hop_hello` is the input's first
//!   `HOP_HELLO_LEN` bytes (bytes after it are tunnel data and do not matter).
//! - For a tunnel id and secret taken from the input, every strict prefix of their encoding
//!   is `Ok(None)`, never an error, and the whole decodes back to them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::chain::{HOP_HELLO_LEN, HOP_MAGIC, HopError, decode_hop_hello, encode_hop_hello};

fuzz_target!(|data: &[u8]| {
    let seen = data.len().min(HOP_MAGIC.len());
    let magic_ok = data[..seen] == HOP_MAGIC[..seen];
    match decode_hop_hello(data) {
        Err(HopError::BadMagic) => assert!(!magic_ok, "refused a right magic"),
        Ok(None) => assert!(magic_ok && data.len() < HOP_HELLO_LEN),
        Ok(Some((tunnel, secret))) => {
            assert!(magic_ok && data.len() >= HOP_HELLO_LEN);
            assert_eq!(encode_hop_hello(tunnel, secret)[..], data[..HOP_HELLO_LEN]);
        }
    }

    let mut tunnel = [0u8; 16];
    let mut secret = [0u8; 32];
    for (dst, src) in tunnel.iter_mut().chain(secret.iter_mut()).zip(data) {
        *dst = *src;
    }
    let enc = encode_hop_hello(tunnel, secret);
    assert_eq!(enc[..4], HOP_MAGIC);
    for cut in 0..enc.len() {
        assert_eq!(decode_hop_hello(&enc[..cut]), Ok(None), "prefix of {cut}");
    }
    let mut with_data = enc.to_vec();
    with_data.extend_from_slice(data);
    assert_eq!(decode_hop_hello(&with_data), Ok(Some((tunnel, secret))));
});
