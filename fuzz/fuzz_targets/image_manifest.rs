//! The image manifest parser and validator: `manifest.json` text → `Manifest`, with every check
//! `Image::open` makes before it looks at the other files.
//!
//! Checks, besides "never panics, never allocates without bound": a manifest that parses
//! holds what the reader promises (regions sorted, disjoint, aligned, below MAX_ADDRESS; runs
//! inside their region and tiling the data file), and writing it out parses back to an equal
//! manifest; a refused one is a manifest, version or geometry error with a message.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use umm::image::{ImageError, Manifest, MAX_ADDRESS};
use umm::PAGE_SIZE;

fn check_invariants(m: &Manifest) {
    let mut prev_end = 0;
    let mut data_pos = 0u64;
    for r in &m.regions {
        assert!(r.start % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0 && r.len > 0);
        assert!(r.start >= prev_end, "regions overlap or are unsorted");
        prev_end = r.range().end;
        assert!(prev_end <= MAX_ADDRESS);
        let mut run_end = 0;
        for run in &r.runs {
            assert!(run.len > 0 && run.offset >= run_end);
            run_end = run.offset + run.len;
            assert!(run_end <= r.len, "run outside its region");
            assert_eq!(run.data_offset, data_pos, "runs do not tile the data file");
            data_pos += run.len;
        }
        assert!(r.data_bytes() <= r.len);
    }
    assert_eq!(data_pos, m.data_len);
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("manifest.json");
    match Manifest::parse(path, data) {
        Ok(m) => {
            check_invariants(&m);
            let text = m.to_json();
            let again = Manifest::parse(path, text.as_bytes())
                .unwrap_or_else(|e| panic!("the written form of a valid manifest is refused: {e}"));
            assert_eq!(again, m);
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ImageError::Manifest { .. }
                        | ImageError::Version { .. }
                        | ImageError::Invalid { .. }
                ),
                "manifest text gave {e:?}"
            );
            assert!(!e.to_string().is_empty());
        }
    }
});
