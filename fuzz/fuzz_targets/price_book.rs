//! The price-book loader (`PriceBook::from_toml` / `from_json`) on arbitrary text.
//! Properties: no panic or hang; a book that loads re-loads from its own TOML.
#![no_main]

use common::catalogue::PriceBook;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for book in [PriceBook::from_toml(text), PriceBook::from_json(text)].into_iter().flatten() {
        let again = book.to_toml().expect("a loaded book serialises");
        PriceBook::from_toml(&again).expect("a loaded book re-loads from its own TOML");
    }
});
