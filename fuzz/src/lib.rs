//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Everything here is deterministic in the fuzz input, so a saved finding replays exactly:
//! [`Rng`] is seeded from the input bytes, [`chunks`] cuts an input the way a socket might
//! deliver it, and [`prefix_cuts`] picks which strict prefixes of an encoding to check.

/// A small pseudo-random generator (xorshift64*) seeded from the fuzz input.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with the FNV-1a hash of `data`.
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // xorshift never leaves 0.
        Self(if h == 0 { 0x9e37_79b9_7f4a_7c15 } else { h })
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }
}

/// Cuts `data` into consecutive chunks of pseudo-random sizes: some empty, most of 1 to 8
/// bytes, a few longer, now and then everything that is left. Concatenated, they are `data`.
pub fn chunks<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = match rng.below(8) {
            0 => 0,
            1..=5 => 1 + rng.below(8),
            6 => 1 + rng.below(256),
            _ => rest.len(),
        };
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

/// The strict prefix lengths of a `len`-byte encoding worth checking: every one for short
/// encodings; for long ones the first and last 64 and 32 spread in between (the decoders look
/// only at the header and the total length, so the middle adds nothing but time).
pub fn prefix_cuts(len: usize) -> Vec<usize> {
    if len <= 256 {
        return (0..len).collect();
    }
    let step = ((len - 128) / 32).max(1);
    (0..64)
        .chain((64..len - 64).step_by(step))
        .chain(len - 64..len)
        .collect()
}
