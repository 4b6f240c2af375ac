//! Per-client packet buffers (pure: no IO, no clock). One [`Queue`] holds a client's packets
//! towards the backends, another the packets waiting for the client. Each is bounded in
//! packets and bytes; the caller also keeps the proxy-wide byte total, from what
//! [`Queue::push`], [`Queue::pop`] and [`Queue::ack`] report.
//!
//! Packets are numbered from 1 as they enter a queue, and the numbers are never reused: for
//! the client's incoming queue they are the `Seq` of the acknowledgement extension
//! (`docs/protocols/longpoll.md` section 4).

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::HeaderMap;
use bytes::Bytes;

/// Bookkeeping bytes charged per packet on top of its body and headers.
pub const PACKET_OVERHEAD: usize = 64;

/// One packet and what travels with it.
#[derive(Debug, Clone, Default)]
pub struct Packet {
    /// The packet's bytes.
    pub body: Bytes,
    /// Its `X-*` headers (nothing else).
    pub headers: HeaderMap,
    /// The client that sent it, when it came from a client or a debug server rather than a
    /// backend.
    pub from: Option<Arc<str>>,
}

impl Packet {
    /// Bytes this packet is charged in buffers.
    pub fn cost(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        self.body.len() + headers + PACKET_OVERHEAD
    }
}

/// A bounded FIFO of numbered packets.
#[derive(Debug)]
pub struct Queue {
    items: VecDeque<(u64, Packet)>,
    bytes: usize,
    next_seq: u64,
    max_packets: usize,
    max_bytes: usize,
}

/// What one delivery from a client's incoming queue hands out.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The packet's number.
    pub seq: u64,
    /// The packet.
    pub packet: Packet,
    /// How many packets remain after it.
    pub more: usize,
    /// Bytes released from the queue by this delivery.
    pub freed: usize,
}

impl Queue {
    /// An empty queue holding at most `max_packets` packets and `max_bytes` bytes.
    pub fn new(max_packets: usize, max_bytes: usize) -> Self {
        Queue {
            items: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            max_packets,
            max_bytes,
        }
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a packet costing `cost` bytes fits.
    pub fn has_room(&self, cost: usize) -> bool {
        self.items.len() < self.max_packets && self.bytes.saturating_add(cost) <= self.max_bytes
    }

    /// Appends `packet` and returns its number, or gives it back when it does not fit.
    pub fn push(&mut self, packet: Packet) -> Result<u64, Box<Packet>> {
        let cost = packet.cost();
        if !self.has_room(cost) {
            return Err(Box::new(packet));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += cost;
        self.items.push_back((seq, packet));
        Ok(seq)
    }

    /// The oldest packet, left in place.
    pub fn front(&self) -> Option<&(u64, Packet)> {
        self.items.front()
    }

    /// Removes the oldest packet; returns it with the bytes released.
    pub fn pop(&mut self) -> Option<(u64, Packet, usize)> {
        let (seq, packet) = self.items.pop_front()?;
        let cost = packet.cost();
        self.bytes -= cost;
        Some((seq, packet, cost))
    }

    /// Forgets every packet numbered up to `upto`; returns the bytes released.
    pub fn ack(&mut self, upto: u64) -> usize {
        let mut freed = 0;
        while self.items.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, _, cost)) = self.pop() {
                freed += cost;
            }
        }
        freed
    }

    /// Hands out the oldest packet for a client. With `keep` (the acknowledgement extension)
    /// it stays queued until [`Queue::ack`] covers it; without, it is removed (the seed's
    /// behaviour).
    pub fn deliver(&mut self, keep: bool) -> Option<Delivery> {
        if keep {
            let (seq, packet) = self.items.front()?.clone();
            Some(Delivery {
                seq,
                packet,
                more: self.items.len() - 1,
                freed: 0,
            })
        } else {
            let (seq, packet, freed) = self.pop()?;
            Some(Delivery {
                seq,
                packet,
                more: self.items.len(),
                freed,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(n: usize) -> Packet {
        Packet {
            body: Bytes::from(vec![7u8; n]),
            ..Packet::default()
        }
    }

    #[test]
    fn numbers_run_from_one_and_are_never_reused() {
        let mut q = Queue::new(10, 10_000);
        assert_eq!(q.push(packet(1)).unwrap(), 1);
        assert_eq!(q.push(packet(1)).unwrap(), 2);
        assert_eq!(q.pop().unwrap().0, 1);
        assert_eq!(q.pop().unwrap().0, 2);
        assert_eq!(q.push(packet(1)).unwrap(), 3);
    }

    #[test]
    fn limits_on_count_and_bytes() {
        let mut q = Queue::new(2, 10_000);
        q.push(packet(1)).unwrap();
        q.push(packet(1)).unwrap();
        assert!(q.push(packet(1)).is_err());
        let mut q = Queue::new(100, 300);
        q.push(packet(100)).unwrap();
        assert_eq!(q.bytes(), 100 + PACKET_OVERHEAD);
        assert!(q.push(packet(100)).is_err());
        assert!(q.push(packet(1)).is_ok());
    }

    #[test]
    fn delivery_without_keep_removes_and_counts_more() {
        let mut q = Queue::new(10, 10_000);
        for _ in 0..3 {
            q.push(packet(5)).unwrap();
        }
        let d = q.deliver(false).unwrap();
        assert_eq!((d.seq, d.more, d.freed), (1, 2, 5 + PACKET_OVERHEAD));
        let d = q.deliver(false).unwrap();
        assert_eq!((d.seq, d.more), (2, 1));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn delivery_with_keep_waits_for_the_ack() {
        let mut q = Queue::new(10, 10_000);
        for _ in 0..3 {
            q.push(packet(5)).unwrap();
        }
        // A lost answer: the same packet comes again until it is acknowledged.
        let d = q.deliver(true).unwrap();
        assert_eq!((d.seq, d.more, d.freed), (1, 2, 0));
        assert_eq!(q.deliver(true).unwrap().seq, 1);
        assert_eq!(q.ack(0), 0);
        assert_eq!(q.ack(1), 5 + PACKET_OVERHEAD);
        let d = q.deliver(true).unwrap();
        assert_eq!((d.seq, d.more), (2, 1));
        assert_eq!(q.ack(10), 2 * (5 + PACKET_OVERHEAD));
        assert!(q.deliver(true).is_none());
        assert_eq!(q.bytes(), 0);
    }
}
