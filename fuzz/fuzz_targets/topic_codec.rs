//! The topic payload codec (common/src/codec.rs) on arbitrary bytes, for every payload type a
//! consumer decodes. Properties: no panic, bounded allocation (the codec's limit), and whatever
//! decodes re-encodes to a payload that decodes to the same value.
#![no_main]

use common::codec::{decode, encode};
use common::rated::RatedRecord;
use common::topic::{DeadLetter, RejectedEvent};
use common::usage::UsageRecord;
use libfuzzer_sys::fuzz_target;

fn roundtrip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = decode::<T>(data) {
        let again: T = decode(&encode(&v)).expect("a decoded value re-encodes");
        assert_eq!(again, v);
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<UsageRecord>(data);
    roundtrip::<RatedRecord>(data);
    roundtrip::<RejectedEvent>(data);
    roundtrip::<DeadLetter>(data);
});
