//! The events the model draws, and their record values.
//!
//! An event is kept as plain values (its ids as `Uuid`s, its search query as
//! word positions) and written straight into its record value, in the wire
//! format of `rtap.v1.InteractionEvent`. Building the prost message first
//! (its ids and query spelled out into strings) and encoding that was a
//! large share of the time spent generating an event; writing the fields
//! directly takes a fraction of it. The bytes are the ones prost
//! writes for [`Event::to_message`], field for field (the tests compare
//! them), so consumers cannot tell the two apart.

use chrono::{DateTime, Utc};
use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;
use rtap::v1::{EventType, InteractionEvent, Source};
use uuid::Uuid;

use super::MICROS_PER_SECOND;

/// The words searches are made of.
pub(super) const SEARCH_WORDS: &[&str] = &[
    "shoes",
    "jacket",
    "lamp",
    "kettle",
    "headphones",
    "backpack",
    "desk",
    "mug",
    "watch",
    "camera",
    "sofa",
    "blender",
    "jeans",
    "scarf",
    "monitor",
    "chair",
    "tent",
    "bike",
];

/// A search query as positions in `SEARCH_WORDS`, spelled out only when its
/// event is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SearchQuery {
    pub(super) words: [u8; 2],
    pub(super) len: u8,
}

impl SearchQuery {
    fn words(self) -> impl Iterator<Item = &'static str> {
        self.words
            .into_iter()
            .take(usize::from(self.len))
            .map(|word| SEARCH_WORDS[usize::from(word)])
    }

    /// The query spelled out: its words, separated by spaces.
    fn text(self) -> String {
        self.words().collect::<Vec<_>>().join(" ")
    }

    /// Length of [`SearchQuery::text`], without spelling it out.
    fn text_len(self) -> usize {
        let words = usize::from(self.len);
        self.words().map(str::len).sum::<usize>() + words.saturating_sub(1)
    }
}

/// One interaction event, as the model drew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Idempotency key.
    pub event_id: Uuid,
    /// Event time, in microseconds since the Unix epoch.
    pub occurred_at_micros: i64,
    /// The user.
    pub user_id: i64,
    /// The product concerned; 0 for page views and searches.
    pub product_id: i64,
    /// Web or mobile app.
    pub source: Source,
    /// What the user did.
    pub event_type: EventType,
    /// The session.
    pub session_id: Uuid,
    /// Time on the page, for page and product views.
    pub dwell_micros: Option<i64>,
    /// For purchases: price times quantity, in millionths of the currency
    /// unit.
    pub amount_micros: i64,
    /// For cart and purchase events: the number of items.
    pub quantity: u32,
    pub(super) search: SearchQuery,
}

impl Event {
    /// Event time.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.occurred_at_micros).unwrap_or_default()
    }

    /// The event as the protobuf message it is encoded as.
    pub fn to_message(&self) -> InteractionEvent {
        InteractionEvent {
            event_id: self.event_id.hyphenated().to_string(),
            occurred_at: Some(timestamp(self.occurred_at_micros)),
            user_id: self.user_id,
            product_id: self.product_id,
            source: self.source as i32,
            r#type: self.event_type as i32,
            session_id: self.session_id.hyphenated().to_string(),
            dwell_time: self.dwell_micros.map(duration),
            amount_micros: self.amount_micros,
            quantity: self.quantity,
            search_query: self.search.text(),
        }
    }

    /// Appends the encoded event to `buffer`: the bytes prost encodes
    /// [`Event::to_message`] into, written without building the message.
    /// Fields in field-number order, each left out when it has its default
    /// value, as prost writes them.
    pub fn encode(&self, buffer: &mut Vec<u8>) {
        use field::*;
        // Written into room made for the longest event, then cut to size,
        // rather than a byte pushed at a time, each push checking the
        // `Vec`'s capacity (measurably slower per event).
        let start = buffer.len();
        buffer.resize(start + MAX_ENCODED_LEN, 0);
        let mut out = WireWriter {
            bytes: &mut buffer[start..],
            len: 0,
        };
        out.uuid(EVENT_ID, self.event_id);
        let time = timestamp(self.occurred_at_micros);
        out.seconds_and_nanos(OCCURRED_AT, time.seconds, time.nanos);
        out.int64(USER_ID, self.user_id);
        out.int64(PRODUCT_ID, self.product_id);
        out.int64(SOURCE, i64::from(self.source as i32));
        out.int64(TYPE, i64::from(self.event_type as i32));
        out.uuid(SESSION_ID, self.session_id);
        if let Some(dwell) = self.dwell_micros.map(duration) {
            out.seconds_and_nanos(DWELL_TIME, dwell.seconds, dwell.nanos);
        }
        out.int64(AMOUNT_MICROS, self.amount_micros);
        out.int64(QUANTITY, i64::from(self.quantity));
        if self.search.len > 0 {
            out.key(SEARCH_QUERY, LENGTH_DELIMITED);
            out.varint(self.search.text_len() as u64);
            for (i, word) in self.search.words().enumerate() {
                if i > 0 {
                    out.put(b" ");
                }
                out.put(word.as_bytes());
            }
        }
        let len = out.len;
        buffer.truncate(start + len);
    }
}

/// A version 4 (random) UUID, as event and session ids are.
pub(super) fn random_uuid(rng: &mut Xoshiro256PlusPlus) -> Uuid {
    // One u128, not `[u8; 16]`: rand draws an array element by element, a
    // word of the generator per byte.
    uuid::Builder::from_random_bytes(rng.random::<u128>().to_le_bytes()).into_uuid()
}

/// Field numbers of `rtap.v1.InteractionEvent` (`proto/rtap/v1/events.proto`)
/// and of the seconds and nanos of `google.protobuf.Timestamp` and
/// `Duration`.
mod field {
    pub(super) const EVENT_ID: u32 = 1;
    pub(super) const OCCURRED_AT: u32 = 2;
    pub(super) const USER_ID: u32 = 3;
    pub(super) const PRODUCT_ID: u32 = 4;
    pub(super) const SOURCE: u32 = 5;
    pub(super) const TYPE: u32 = 6;
    pub(super) const SESSION_ID: u32 = 7;
    pub(super) const DWELL_TIME: u32 = 8;
    pub(super) const AMOUNT_MICROS: u32 = 9;
    pub(super) const QUANTITY: u32 = 10;
    pub(super) const SEARCH_QUERY: u32 = 11;
    pub(super) const SECONDS: u32 = 1;
    pub(super) const NANOS: u32 = 2;
}

/// Wire types (protobuf encoding spec).
const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;
/// A UUID in its hyphenated text form.
const UUID_TEXT_LEN: usize = uuid::fmt::Hyphenated::LENGTH;
/// The longest a varint gets (a negative number).
const MAX_VARINT_LEN: usize = 10;
/// The longest encoded event: every field at its longest (a one-byte key
/// each, as every field number is below 16).
const MAX_ENCODED_LEN: usize = {
    let int64 = 1 + MAX_VARINT_LEN;
    let uuid = 2 + UUID_TEXT_LEN;
    let seconds_and_nanos = 2 + 2 * int64;
    let mut longest_word = 0;
    let mut word = 0;
    while word < SEARCH_WORDS.len() {
        if SEARCH_WORDS[word].len() > longest_word {
            longest_word = SEARCH_WORDS[word].len();
        }
        word += 1;
    }
    // Two words and a space: under 128 bytes, so a one-byte length.
    let search = 2 + 2 * longest_word + 1;
    2 * uuid + 2 * seconds_and_nanos + 6 * int64 + search
};

/// Writes protobuf fields into a slice with room for them.
struct WireWriter<'a> {
    bytes: &'a mut [u8],
    len: usize,
}

impl WireWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.bytes[self.len] = (value as u8 & 0x7f) | 0x80;
            self.len += 1;
            value >>= 7;
        }
        self.bytes[self.len] = value as u8;
        self.len += 1;
    }

    fn key(&mut self, field: u32, wire_type: u32) {
        self.varint(u64::from(field << 3 | wire_type));
    }

    /// An `int64`, `int32`, `uint32` or enum field: negative values take
    /// ten bytes (the two's complement as a 64-bit varint), as protobuf
    /// requires.
    fn int64(&mut self, field: u32, value: i64) {
        if value != 0 {
            self.key(field, VARINT);
            self.varint(value as u64);
        }
    }

    /// A UUID as a string field, in its hyphenated lower-case form.
    fn uuid(&mut self, field: u32, id: Uuid) {
        self.key(field, LENGTH_DELIMITED);
        self.varint(UUID_TEXT_LEN as u64);
        let text = &mut self.bytes[self.len..self.len + UUID_TEXT_LEN];
        id.hyphenated().encode_lower(text);
        self.len += UUID_TEXT_LEN;
    }

    /// A `Timestamp` or `Duration` message field (both are seconds and
    /// nanos).
    fn seconds_and_nanos(&mut self, field: u32, seconds: i64, nanos: i32) {
        let nanos = i64::from(nanos);
        let field_len = |value: i64| {
            if value == 0 {
                0
            } else {
                1 + varint_len(value as u64)
            }
        };
        self.key(field, LENGTH_DELIMITED);
        self.varint((field_len(seconds) + field_len(nanos)) as u64);
        self.int64(field::SECONDS, seconds);
        self.int64(field::NANOS, nanos);
    }
}

fn varint_len(value: u64) -> usize {
    // 7 bits per byte; 0 takes one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(MICROS_PER_SECOND),
        nanos: i32::try_from(micros.rem_euclid(MICROS_PER_SECOND) * 1000).unwrap_or(0),
    }
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / MICROS_PER_SECOND,
        nanos: i32::try_from((micros % MICROS_PER_SECOND) * 1000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    use super::*;

    /// Any values, not only the model's: negative, zero and extreme ones
    /// included, so every branch of the encoding meets prost's.
    fn arbitrary_event(rng: &mut Xoshiro256PlusPlus) -> Event {
        let value = |rng: &mut Xoshiro256PlusPlus| match rng.random_range(0..6) {
            0 => 0,
            1 => i64::MIN,
            2 => i64::MAX,
            3 => -rng.random_range(1..1_000_000_000_000),
            4 => rng.random_range(1..128),
            _ => rng.random(),
        };
        let search_len = rng.random_range(0..=2);
        Event {
            event_id: Uuid::from_u128(rng.random()),
            occurred_at_micros: value(rng) / 4,
            user_id: value(rng),
            product_id: value(rng),
            source: [Source::Unspecified, Source::Web, Source::MobileApp][rng.random_range(0..3)],
            event_type: EventType::try_from(rng.random_range(0..7)).unwrap_or_default(),
            session_id: if rng.random_bool(0.1) {
                Uuid::nil()
            } else {
                Uuid::from_u128(rng.random())
            },
            dwell_micros: rng.random_bool(0.7).then(|| value(rng)),
            amount_micros: value(rng),
            quantity: if rng.random_bool(0.5) {
                0
            } else {
                rng.random()
            },
            search: SearchQuery {
                words: [
                    rng.random_range(0..SEARCH_WORDS.len()) as u8,
                    rng.random_range(0..SEARCH_WORDS.len()) as u8,
                ],
                len: search_len,
            },
        }
    }

    #[test]
    fn events_encode_to_the_bytes_prost_writes_for_their_message() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        for _ in 0..100_000 {
            let event = arbitrary_event(&mut rng);
            let message = event.to_message();
            let mut encoded = vec![0xaa]; // appended to what is there
            event.encode(&mut encoded);
            assert_eq!(encoded[1..], message.encode_to_vec(), "{event:?}");
            assert_eq!(
                InteractionEvent::decode(&encoded[1..]).expect("decodes"),
                message
            );
        }
    }

    #[test]
    fn the_longest_event_fits_the_room_made_for_it() {
        let longest_word = SEARCH_WORDS
            .iter()
            .enumerate()
            .max_by_key(|(_, word)| word.len())
            .map_or(0, |(position, _)| position as u8);
        let event = Event {
            event_id: Uuid::max(),
            occurred_at_micros: i64::MIN,
            user_id: -1,
            product_id: -1,
            source: Source::MobileApp,
            event_type: EventType::Search,
            session_id: Uuid::max(),
            dwell_micros: Some(-1),
            amount_micros: -1,
            quantity: u32::MAX,
            search: SearchQuery {
                words: [longest_word; 2],
                len: 2,
            },
        };
        let mut encoded = Vec::new();
        event.encode(&mut encoded);
        assert_eq!(encoded, event.to_message().encode_to_vec());
        assert!(encoded.len() <= MAX_ENCODED_LEN);
    }

    #[test]
    fn varint_lengths_match_the_varints_written() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ]
        .into_iter()
        .chain((0..64).map(|bit| 1 << bit))
        {
            let mut written = [0; MAX_VARINT_LEN];
            let mut out = WireWriter {
                bytes: &mut written,
                len: 0,
            };
            out.varint(value);
            assert_eq!(varint_len(value), out.len, "{value}");
        }
    }

    #[test]
    fn search_queries_are_their_words_separated_by_spaces() {
        let query = |words: [u8; 2], len| SearchQuery { words, len };
        assert_eq!(query([0, 0], 0).text(), "");
        assert_eq!(query([4, 0], 1).text(), "headphones");
        assert_eq!(query([4, 17], 2).text(), "headphones bike");
        for len in 0..=2 {
            let query = query([3, 9], len);
            assert_eq!(query.text_len(), query.text().len());
        }
    }

    #[test]
    fn ids_are_random_version_4_uuids() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let ids: Vec<Uuid> = (0..1000).map(|_| random_uuid(&mut rng)).collect();
        for id in &ids {
            assert_eq!(id.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        // The other 122 bits vary: every bit position takes both values.
        let (ones, zeros) = ids.iter().fold((0u128, 0u128), |(ones, zeros), id| {
            (ones | id.as_u128(), zeros | !id.as_u128())
        });
        let fixed = (0xf << 76) | (0b11 << 62);
        assert_eq!(ones & zeros, !fixed);
    }
}
