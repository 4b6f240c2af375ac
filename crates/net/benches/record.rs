//! Criterion benchmarks of the TLS 1.3 record layer (`tube_net::record`): sealing and opening
//! one record of a short message (a 64-byte payload in a DATA frame, as a round trip sends)
//! and of a full 16 KiB record, and ring's AES-128-GCM alone on the same short input (the
//! suite tube negotiates first) to show what the record layer adds around it.
//! Run: `cargo bench -p tube-net --bench record`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::crypto::cipher::{AeadKey, Iv};
use tube_net::record::{ContentType, HEADER_LEN, Opener, Sealer};

/// A 64-byte message behind a 9-byte DATA frame header.
const SHORT: usize = 73;

fn secrets() -> ConnectionTrafficSecrets {
    // AES-256-GCM: rustls builds 16-byte keys only inside its handshake.
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7; 32]),
        iv: Iv::from([0x5d; 12]),
    }
}

fn seal_open(c: &mut Criterion, name: &str, len: usize) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(len as u64));
    let plain = vec![0xa5u8; len];
    let mut sealer = Sealer::new(&secrets(), 0).expect("keys");
    let mut out = Vec::with_capacity(len + 64);
    g.bench_function("seal", |b| {
        b.iter(|| {
            out.clear();
            sealer
                .seal(ContentType::ApplicationData, &plain, &mut out)
                .expect("seal");
            std::hint::black_box(&out);
        })
    });
    // Open: each iteration opens a fresh copy of one record sealed for the matching sequence.
    let mut sealer = Sealer::new(&secrets(), 0).expect("keys");
    let mut opener = Opener::new(&secrets(), 0).expect("keys");
    let mut record = Vec::new();
    let mut work = Vec::new();
    g.bench_function("seal+open", |b| {
        b.iter(|| {
            record.clear();
            sealer
                .seal(ContentType::ApplicationData, &plain, &mut record)
                .expect("seal");
            work.clear();
            work.extend_from_slice(&record);
            let (_, n) = opener.open(&mut work).expect("open");
            std::hint::black_box(&work[HEADER_LEN..HEADER_LEN + n]);
        })
    });
    g.finish();
}

fn records(c: &mut Criterion) {
    seal_open(c, "record 73 B", SHORT);
    seal_open(c, "record 16 KiB", 16 * 1024);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[9; 16]).expect("key"));
    let mut g = c.benchmark_group("ring AES-128-GCM 74 B");
    g.throughput(Throughput::Bytes(SHORT as u64 + 1));
    let mut buf = vec![0x3cu8; SHORT + 1];
    let mut seq = 0u64;
    g.bench_function("seal", |b| {
        b.iter(|| {
            seq += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&seq.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from([23u8, 3, 3, 0, 90]),
                    &mut buf,
                )
                .expect("seal");
            let _ = std::hint::black_box(tag);
        })
    });
    g.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
