//! The `/proc/PID/maps` and `/proc/PID/smaps` parsers (src/sys/proc.rs): the manager reads
//! these for every attached process and after every unexpected fault.
//!
//! Checks, besides "never panics": parsed entries are non-empty ranges; the registered share
//! of anonymous memory never exceeds the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umm::sys::proc::{parse_maps, parse_smaps_coverage, parse_vm_flags};

fuzz_target!(|data: &[u8]| {
    // procfs text is read with read_to_string: non-UTF-8 never reaches the parsers.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = parse_maps(text) {
        for e in &entries {
            assert!(e.start < e.end);
            assert_eq!(e.len(), e.end - e.start);
            let _ = (e.is_servable(), e.is_private_anonymous());
        }
    }
    let cov = parse_smaps_coverage(text);
    assert!(cov.registered_anon_bytes <= cov.anon_bytes);
    if let Some(r) = cov.ratio() {
        assert!((0.0..=1.0).contains(&r));
    }
    let _ = parse_vm_flags(text);
});
