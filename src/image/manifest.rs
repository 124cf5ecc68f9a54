//! `manifest.json`: the JSON form (private serde structs), its parsing with limits, the
//! structural validation shared by the reader and the writer, and its serialization.
//!
//! Addresses, lengths and offsets are hex strings (`"0x7f0000001000"`): JSON numbers lose
//! precision above 2^53 in many readers. `data_len`, `pid` and `created_unix` are plain numbers.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::{
    DataRun, ImageError, Manifest, Prot, Region, CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION,
    MAX_ADDRESS, MAX_REGIONS, MAX_RUNS, REGION_FLAGS,
};
use crate::PAGE_SIZE;

/// A `u64` written as a `0x`-prefixed hex string: 1 to 16 hex digits, no sign, no spaces. Read
/// in either case, written in lower case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hex(u64);

pub(super) fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Hex;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hex string like \"0x1000\" (1 to 16 hex digits)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Hex, E> {
                parse_hex(v)
                    .map(Hex)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// Protection as three letters, `r`/`w`/`x` or `-` in that position (`"rw-"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProtStr(Prot);

pub(super) fn prot_to_str(p: Prot) -> String {
    let mut s = String::with_capacity(3);
    s.push(if p & 1 != 0 { 'r' } else { '-' });
    s.push(if p & 2 != 0 { 'w' } else { '-' });
    s.push(if p & 4 != 0 { 'x' } else { '-' });
    s
}

pub(super) fn parse_prot(s: &str) -> Option<Prot> {
    let b = s.as_bytes();
    if b.len() != 3 {
        return None;
    }
    let mut p = 0;
    for (i, (&c, letter)) in b.iter().zip([b'r', b'w', b'x']).enumerate() {
        if c == letter {
            p |= 1 << i;
        } else if c != b'-' {
            return None;
        }
    }
    Some(p)
}

impl Serialize for ProtStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&prot_to_str(self.0))
    }
}

impl<'de> Deserialize<'de> for ProtStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ProtStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protection like \"rw-\" (r, w, x or - in each of 3 places)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ProtStr, E> {
                parse_prot(v)
                    .map(ProtStr)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

/// A sequence of at most `MAX` elements: the limit is enforced while parsing, so a hostile
/// manifest cannot make a huge vector before it is refused.
struct Bounded<T, const MAX: usize>(Vec<T>);

impl<T: Serialize, const MAX: usize> Serialize for Bounded<T, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = Bounded<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of at most {MAX} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(x) = seq.next_element()? {
                    if v.len() == MAX {
                        return Err(de::Error::custom(format_args!(
                            "more than {MAX} elements (the limit)"
                        )));
                    }
                    v.push(x);
                }
                Ok(Bounded(v))
            }
        }
        d.deserialize_seq(V::<T, MAX>(PhantomData))
    }
}

/// A JSON object, and only an object: serde's derived structs also accept an array of the
/// field values in order, a spelling umm-image(5) does not allow.
struct Obj<T>(T);

impl<T: Serialize> Serialize for Obj<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(V::<T>(PhantomData))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestJson {
    format: String,
    version: u32,
    page_size: u64,
    chunk_size: u64,
    data_len: u64,
    source: Obj<SourceJson>,
    regions: Bounded<Obj<RegionJson>, MAX_REGIONS>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceJson {
    pid: u32,
    exe: String,
    created_unix: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionJson {
    start: Hex,
    len: Hex,
    prot: ProtStr,
    flags: Bounded<String, 16>,
    name: String,
    runs: Bounded<RunJson, MAX_RUNS>,
}

/// `[offset, len, data_offset]`.
#[derive(Serialize, Deserialize)]
struct RunJson(Hex, Hex, Hex);

/// First pass: only the format name and version, everything else ignored, so that a manifest
/// of another format or a later version is reported as such rather than as unknown fields.
#[derive(Deserialize)]
struct Probe {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

fn manifest_err(path: &Path, detail: impl Into<String>) -> ImageError {
    ImageError::Manifest {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Parse and validate manifest bytes (`path` only names the file in errors). The caller has
/// already refused files above [`super::MAX_MANIFEST_BYTES`].
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest, ImageError> {
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| manifest_err(path, e.to_string()))?;
    if let Some(f) = &probe.format {
        if f.as_str() != Some(FORMAT_NAME) {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: format!("format {f}"),
            });
        }
    }
    if let Some(v) = &probe.version {
        if v.as_u64() != Some(u64::from(FORMAT_VERSION)) {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: format!("version {v}"),
            });
        }
    }
    let j: Obj<ManifestJson> =
        serde_json::from_slice(bytes).map_err(|e| manifest_err(path, e.to_string()))?;
    let m = from_json(path, j.0)?;
    validate(path, &m)?;
    Ok(m)
}

fn from_json(path: &Path, j: ManifestJson) -> Result<Manifest, ImageError> {
    // The probe saw these, but a manifest without them gets here only if serde reported them
    // missing; check again so this function stands alone.
    if j.format != FORMAT_NAME || j.version != FORMAT_VERSION {
        return Err(ImageError::Version {
            path: path.to_path_buf(),
            found: format!("format {:?} version {}", j.format, j.version),
        });
    }
    let mut regions = Vec::with_capacity(j.regions.0.len());
    for (i, Obj(r)) in j.regions.0.into_iter().enumerate() {
        check_flags(&r.flags.0).map_err(|d| manifest_err(path, format!("region {i}: {d}")))?;
        regions.push(Region {
            start: r.start.0,
            len: r.len.0,
            prot: r.prot.0,
            flags: r.flags.0,
            name: r.name,
            runs: r
                .runs
                .0
                .into_iter()
                .map(|RunJson(o, l, d)| DataRun {
                    offset: o.0,
                    len: l.0,
                    data_offset: d.0,
                })
                .collect(),
        });
    }
    Ok(Manifest {
        version: j.version,
        page_size: j.page_size,
        chunk_size: j.chunk_size,
        data_len: j.data_len,
        source_pid: j.source.0.pid,
        source_exe: j.source.0.exe,
        created_unix: j.source.0.created_unix,
        regions,
    })
}

/// Flags must be words of [`REGION_FLAGS`], each at most once.
pub(super) fn check_flags<S: AsRef<str>>(flags: &[S]) -> Result<(), String> {
    for (i, f) in flags.iter().enumerate() {
        let f = f.as_ref();
        if !REGION_FLAGS.contains(&f) {
            return Err(format!(
                "unknown flag {f:?} (known: {})",
                REGION_FLAGS.join(", ")
            ));
        }
        if flags[..i].iter().any(|g| g.as_ref() == f) {
            return Err(format!("flag {f:?} given twice"));
        }
    }
    Ok(())
}

/// Human form of a region for error details.
fn region_label(i: usize, r: &Region) -> String {
    format!(
        "region {i} ({:#x}+{:#x}{})",
        r.start,
        r.len,
        if r.name.is_empty() {
            String::new()
        } else {
            format!(" {}", r.name)
        }
    )
}

/// Every rule of umm-image(5) that does not need the other files: field ranges, region and run
/// geometry, limits, and that the runs tile `[0, data_len)` of the data file in order.
pub(super) fn validate(path: &Path, m: &Manifest) -> Result<(), ImageError> {
    if m.version != FORMAT_VERSION {
        return Err(ImageError::Version {
            path: path.to_path_buf(),
            found: format!("version {}", m.version),
        });
    }
    if m.page_size != PAGE_SIZE {
        return Err(manifest_err(
            path,
            format!("page_size {} (this build reads {PAGE_SIZE})", m.page_size),
        ));
    }
    if m.chunk_size != CHUNK_SIZE {
        return Err(manifest_err(
            path,
            format!(
                "chunk_size {} (this build reads {CHUNK_SIZE})",
                m.chunk_size
            ),
        ));
    }
    if m.regions.len() > MAX_REGIONS {
        return Err(manifest_err(
            path,
            format!("{} regions (the limit is {MAX_REGIONS})", m.regions.len()),
        ));
    }
    let total_runs: usize = m.regions.iter().map(|r| r.runs.len()).sum();
    if total_runs > MAX_RUNS {
        return Err(manifest_err(
            path,
            format!("{total_runs} runs (the limit is {MAX_RUNS})"),
        ));
    }
    let aligned = |v: u64| v % PAGE_SIZE == 0;
    let mut prev_end = 0u64;
    let mut data_pos = 0u64;
    for (i, r) in m.regions.iter().enumerate() {
        let label = || region_label(i, r);
        if r.prot & !7 != 0 {
            return Err(manifest_err(
                path,
                format!("{}: prot {:#x}", label(), r.prot),
            ));
        }
        check_flags(&r.flags).map_err(|d| manifest_err(path, format!("{}: {d}", label())))?;
        if !aligned(r.start) || !aligned(r.len) {
            return Err(invalid(path, format!("{}: not page aligned", label())));
        }
        if r.len == 0 {
            return Err(invalid(path, format!("{}: empty", label())));
        }
        let end = match r.start.checked_add(r.len) {
            Some(e) if e <= MAX_ADDRESS => e,
            _ => {
                return Err(invalid(
                    path,
                    format!("{}: ends above {MAX_ADDRESS:#x}", label()),
                ))
            }
        };
        if i > 0 && r.start < prev_end {
            return Err(invalid(
                path,
                format!(
                    "{}: starts below the end of the region before it ({prev_end:#x}): regions must be sorted and must not overlap",
                    label()
                ),
            ));
        }
        prev_end = end;
        let mut run_end = 0u64;
        for (k, run) in r.runs.iter().enumerate() {
            let rl = || {
                format!(
                    "{}: run {k} [{:#x}, {:#x}, {:#x}]",
                    label(),
                    run.offset,
                    run.len,
                    run.data_offset
                )
            };
            if !aligned(run.offset) || !aligned(run.len) || !aligned(run.data_offset) {
                return Err(invalid(path, format!("{}: not page aligned", rl())));
            }
            if run.len == 0 {
                return Err(invalid(path, format!("{}: empty", rl())));
            }
            match run.offset.checked_add(run.len) {
                Some(e) if e <= r.len => {
                    if k > 0 && run.offset < run_end {
                        return Err(invalid(
                            path,
                            format!(
                                "{}: starts before the end of the run before it ({run_end:#x}): runs must be sorted and must not overlap",
                                rl()
                            ),
                        ));
                    }
                    run_end = e;
                }
                _ => {
                    return Err(invalid(
                        path,
                        format!("{}: reaches outside its region", rl()),
                    ))
                }
            }
            if run.data_offset != data_pos {
                return Err(invalid(
                    path,
                    format!(
                        "{}: data at {:#x}, expected {data_pos:#x}: data runs must follow each other in the data file without gaps or overlaps",
                        rl(),
                        run.data_offset
                    ),
                ));
            }
            data_pos = data_pos
                .checked_add(run.len)
                .ok_or_else(|| invalid(path, format!("{}: data offsets overflow", rl())))?;
        }
    }
    if data_pos != m.data_len {
        return Err(invalid(
            path,
            format!(
                "the runs hold {data_pos:#x} bytes of data but data_len is {:#x}",
                m.data_len
            ),
        ));
    }
    Ok(())
}

/// The manifest as JSON text: the header on the first line, then one region per line, so that
/// line-oriented tools stay usable on large images. Ends with a newline.
pub(super) fn to_json(m: &Manifest) -> String {
    let source = SourceJson {
        pid: m.source_pid,
        exe: m.source_exe.clone(),
        created_unix: m.created_unix,
    };
    let mut s = String::new();
    s.push_str(&format!(
        "{{\"format\":{},\"version\":{},\"page_size\":{},\"chunk_size\":{},\"data_len\":{},\n\"source\":{},\n\"regions\":[",
        json(&FORMAT_NAME),
        m.version,
        m.page_size,
        m.chunk_size,
        m.data_len,
        json(&source),
    ));
    for (i, r) in m.regions.iter().enumerate() {
        let rj = RegionJson {
            start: Hex(r.start),
            len: Hex(r.len),
            prot: ProtStr(r.prot),
            flags: Bounded(r.flags.clone()),
            name: r.name.clone(),
            runs: Bounded(
                r.runs
                    .iter()
                    .map(|run| RunJson(Hex(run.offset), Hex(run.len), Hex(run.data_offset)))
                    .collect(),
            ),
        };
        s.push_str(if i == 0 { "\n" } else { ",\n" });
        s.push_str(&json(&rj));
    }
    s.push_str("\n]}\n");
    s
}

fn json<T: Serialize>(v: &T) -> String {
    // Serializing these plain structs (strings, integers, sequences) cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_accepts_prefixed_digits_in_either_case_and_nothing_else() {
        assert_eq!(parse_hex("0x0"), Some(0));
        assert_eq!(parse_hex("0x7fFF0000"), Some(0x7fff_0000));
        assert_eq!(parse_hex("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex("0x0000000000000001"), Some(1));
        for bad in [
            "",
            "0x",
            "1000",
            "0X10",
            "0x+1",
            "0x-1",
            " 0x1",
            "0x1 ",
            "0x1g",
            "0x10000000000000000",
            "0x00000000000000001",
        ] {
            assert_eq!(parse_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn prot_letters_map_to_prot_bits_both_ways() {
        for p in 0..8 {
            assert_eq!(parse_prot(&prot_to_str(p)), Some(p));
        }
        assert_eq!(parse_prot("r-x"), Some(5));
        for bad in ["", "rw", "rwxx", "wr-", "RW-", "r w", "---\n"] {
            assert_eq!(parse_prot(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn flags_must_be_known_words_given_once() {
        assert!(check_flags(&["private", "anonymous"]).is_ok());
        assert!(check_flags::<&str>(&[]).is_ok());
        assert!(check_flags(REGION_FLAGS).is_ok());
        assert!(check_flags(&["shared"])
            .unwrap_err()
            .contains("unknown flag"));
        assert!(check_flags(&["heap", "heap"])
            .unwrap_err()
            .contains("twice"));
    }
}
