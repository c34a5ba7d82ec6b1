//! Redis's HyperLogLog built in the consumer, for a key that does not exist
//! yet: the registers `PFADD` would set, in Redis's sparse encoding, written
//! with one `SET … NX EXAT`: Redis edits a sparse string once per user a
//! `PFADD` adds, and the key would need an `EXPIREAT` besides, while a `SET`
//! replaces it in one step (the README's bench section has the figures).
//!
//! The encoding is Redis's own (`hyperloglog.c`, unchanged since Redis
//! 2.8.9): a 16-byte header (`HYLL`, encoding 1 = sparse, three unused
//! bytes, a cached cardinality marked stale), then opcodes covering the
//! 16,384 registers in order: `ZERO` (00xxxxxx: 1 to 64 empty registers),
//! `XZERO` (01xxxxxx yyyyyyyy: 1 to 16,384) and `VAL` (1vvvvvxx: 1 to 4
//! registers of value 1 to 32). An element's register and value come from
//! its 64-bit MurmurHash2 (seed `0xadc83b19`): the low 14 bits pick the
//! register, the value is one more than the trailing zeros of the rest.

use std::io::Write as _;

/// Registers of a Redis HyperLogLog (2^14).
const REGISTERS: usize = 1 << 14;
/// Bits of the hash that pick the register.
const INDEX_BITS: u32 = 14;
/// Bits of the hash left for the value.
const VALUE_BITS: u32 = 64 - INDEX_BITS;
/// Largest value the sparse encoding holds; a larger one needs the dense
/// encoding (one element in 2^32 has one).
const MAX_SPARSE_VALUE: u8 = 32;
/// Redis's default `hll-sparse-max-bytes`: Redis itself keeps no larger
/// sparse string, so neither does this.
pub(crate) const MAX_SPARSE_BYTES: usize = 3000;
const HEADER: [u8; 16] = [
    b'H', b'Y', b'L', b'L', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
];

/// A set's registers that are not empty, with their values, sorted by
/// register.
pub(crate) type Registers = Vec<(u16, u8)>;

/// The sparse HyperLogLog of `users` (each added as its decimal text, as
/// `PFADD key user` adds it), or `None` when the sparse encoding cannot hold
/// it or would be over [`MAX_SPARSE_BYTES`] (then `PFADD` builds it).
pub fn sparse(users: impl IntoIterator<Item = i64>) -> Option<Vec<u8>> {
    encode_sparse(&registers(users))
}

/// The registers `users` set, with their values: sorted by register, the
/// largest value of each.
pub fn registers(users: impl IntoIterator<Item = i64>) -> Registers {
    let mut registers: Vec<(u16, u8)> = users
        .into_iter()
        .map(|user| {
            let mut text = [0u8; 20];
            let mut rest = &mut text[..];
            // 20 bytes hold any i64 (with its sign): the write cannot fail.
            let _ = write!(rest, "{user}");
            let written = 20 - rest.len();
            register_and_value(&text[..written])
        })
        .collect();
    // Per register, the largest value: last after sorting.
    registers.sort_unstable();
    registers.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });
    registers
}

/// The registers of the union of two sets, each as [`registers`] gives them.
pub fn union(first: &[(u16, u8)], second: &[(u16, u8)]) -> Registers {
    let mut union = Vec::with_capacity(first.len() + second.len());
    let (mut i, mut j) = (0, 0);
    while i < first.len() && j < second.len() {
        let (x, y) = (first[i], second[j]);
        match x.0.cmp(&y.0) {
            std::cmp::Ordering::Less => {
                union.push(x);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                union.push(y);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                union.push((x.0, x.1.max(y.1)));
                i += 1;
                j += 1;
            }
        }
    }
    union.extend_from_slice(&first[i..]);
    union.extend_from_slice(&second[j..]);
    union
}

/// Redis's sparse encoding of `registers` (as [`registers`] gives them), or
/// `None` when it cannot hold them or would be over [`MAX_SPARSE_BYTES`].
pub fn encode_sparse(registers: &[(u16, u8)]) -> Option<Vec<u8>> {
    if registers.iter().any(|(_, value)| *value > MAX_SPARSE_VALUE) {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER.len() + 4 * registers.len() + 2);
    out.extend_from_slice(&HEADER);
    let mut next = 0;
    for &(register, value) in registers {
        let register = usize::from(register);
        push_zeros(&mut out, register - next);
        // VAL, a run of one register.
        out.push(0x80 | ((value - 1) << 2));
        next = register + 1;
    }
    push_zeros(&mut out, REGISTERS - next);
    (out.len() <= MAX_SPARSE_BYTES).then_some(out)
}

/// Appends opcodes for `count` empty registers.
fn push_zeros(out: &mut Vec<u8>, mut count: usize) {
    while count > 0 {
        if count > 64 {
            let run = count.min(REGISTERS);
            let encoded = u16::try_from(run - 1).unwrap_or(u16::MAX);
            out.push(0x40 | (encoded >> 8) as u8);
            out.push((encoded & 0xff) as u8);
            count -= run;
        } else {
            out.push(u8::try_from(count - 1).unwrap_or(63));
            count = 0;
        }
    }
}

/// The register an element goes to and the value it brings.
fn register_and_value(element: &[u8]) -> (u16, u8) {
    let hash = murmur_hash_64a(element, 0xadc8_3b19);
    let register = (hash & (REGISTERS as u64 - 1)) as u16;
    // The sentinel bit caps the value at VALUE_BITS + 1.
    let rest = (hash >> INDEX_BITS) | (1 << VALUE_BITS);
    (register, rest.trailing_zeros() as u8 + 1)
}

/// MurmurHash64A, as Redis computes it (little-endian 8-byte reads).
fn murmur_hash_64a(data: &[u8], seed: u64) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h = seed ^ (data.len() as u64).wrapping_mul(M);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let mut k = u64::from_le_bytes(bytes);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (position, byte) in tail.iter().enumerate().rev() {
            h ^= u64::from(*byte) << (8 * position);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a sparse HyperLogLog into its registers, checking that the
    /// opcodes cover exactly every register.
    fn decode(sparse: &[u8]) -> Vec<u8> {
        assert_eq!(&sparse[..16], &HEADER);
        let mut registers = Vec::new();
        let mut bytes = sparse[16..].iter();
        while let Some(&byte) = bytes.next() {
            match byte >> 6 {
                0 => registers.extend(std::iter::repeat_n(0, usize::from(byte) + 1)),
                1 => {
                    let low = *bytes.next().expect("XZERO has two bytes");
                    let run = (usize::from(byte & 0x3f) << 8 | usize::from(low)) + 1;
                    registers.extend(std::iter::repeat_n(0, run));
                }
                _ => {
                    let value = ((byte >> 2) & 0x1f) + 1;
                    registers.extend(std::iter::repeat_n(value, usize::from(byte & 3) + 1));
                }
            }
        }
        assert_eq!(registers.len(), REGISTERS);
        registers
    }

    #[test]
    fn the_union_of_two_sets_has_the_registers_of_all_their_users() {
        let first: Vec<i64> = (1..=400).collect();
        let second: Vec<i64> = (300..=900).chain([-5, i64::MIN]).collect();
        let union = union(
            &registers(first.iter().copied()),
            &registers(second.iter().copied()),
        );
        let all = registers(first.iter().chain(&second).copied());
        assert_eq!(union, all);
        assert!(union.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert_eq!(
            encode_sparse(&union),
            sparse(first.into_iter().chain(second))
        );
        assert_eq!(super::union(&all, &[]), all);
        assert_eq!(super::union(&[], &all), all);
    }

    #[test]
    fn an_empty_set_is_all_zero_registers_in_two_opcodes() {
        let empty = sparse([]).expect("empty fits");
        assert_eq!(empty.len(), 16 + 2);
        assert!(decode(&empty).iter().all(|r| *r == 0));
    }

    #[test]
    fn each_register_keeps_the_largest_value_of_its_elements() {
        let users: Vec<i64> = (1..=700).chain([-7, i64::MAX, i64::MIN]).collect();
        let encoded = sparse(users.iter().copied()).expect("fits");
        let mut expected = vec![0u8; REGISTERS];
        for user in &users {
            let (register, value) = register_and_value(user.to_string().as_bytes());
            let slot = &mut expected[usize::from(register)];
            *slot = (*slot).max(value);
        }
        assert_eq!(decode(&encoded), expected);
        // Repeats change nothing.
        let twice = sparse(users.iter().chain(&users).copied()).expect("fits");
        assert_eq!(twice, encoded);
    }

    #[test]
    fn a_set_too_large_for_the_sparse_limit_is_left_to_pfadd() {
        assert!(sparse(0..5000).is_none());
    }

    #[test]
    fn registers_and_values_match_what_redis_sets() {
        // Read from Redis 7.0 with PFADD then PFDEBUG GETREG: lengths 1 to
        // 19 cover the 8-byte words and every tail path that matters.
        for (element, register, value) in [
            ("1", 7527, 1),
            ("12345678", 10579, 3),
            ("123456789012", 7230, 2),
            ("-7", 3378, 1),
            ("9223372036854775807", 26, 2),
        ] {
            assert_eq!(
                register_and_value(element.as_bytes()),
                (register, value),
                "{element}"
            );
        }
    }
}
