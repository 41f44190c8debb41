//! Property-based fuzz tests for the parsers that take outside input: fleet commands and their
//! signatures, the device config, bundle manifests, weights-set reassembly and image decoding.
//!
//! For arbitrary and mutated input every parser must answer with an error, never panic, and stay
//! within a fixed memory bound (a counting allocator measures each call on its own thread). Valid
//! generated input must round-trip where the API allows.
//!
//! The runs are deterministic: a fixed ChaCha seed and no regression files, sized for CI. For a
//! longer or different run (both variables apply to every test here):
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release --test fuzz_inputs
//! PROPTEST_RNG_SEED=12345 cargo test --test fuzz_inputs
//! ```
//!
//! Ignored tests reproduce known bugs: `cargo test --test fuzz_inputs -- --ignored`.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;

use base64::Engine;
use edgeadapt::config::DeviceConfig;
use edgeadapt::imaging::{DecodeLimits, ImageInputError, decode_bytes};
use edgeadapt::model::manifest::{
    ColorMode, HeadSpec, InputContract, Layout, Manifest, Provenance, ReferenceSpec, ResizePolicy, TailLayerKind,
    TailLayerSpec, TrunkSpec,
};
use edgeadapt::protocol::VersionRef;
use edgeadapt::protocol::commands::{self, Command, PolicyUpdate};
use edgeadapt::protocol::messages::{COMMAND_SCHEMA, CommandMessage, WEIGHTS_SCHEMA, WeightsManifest};
use edgeadapt::protocol::signing::{Authority, Signer};
use edgeadapt::protocol::weights::{self, Reassembly};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{RngAlgorithm, RngSeed};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const DEFAULT_CONFIG: &str = include_str!("../device-config/default.toml");
const BUNDLED_MANIFEST: &str = include_str!("../models/efficientnet-lite0-fonts36/manifest.toml");
const COMMAND_KEY: &[u8] = b"fleet command key";
/// The device the fuzzed commands reach, and its clock.
const DEVICE: &str = "fuzz-device";
const NOW_MS: i64 = 1_800_000_000_000;
const COMMAND_NAMES: [&str; 8] =
    ["adapt", "rollback", "status", "set-policy", "label", "publish-weights", "offer", "adopt"];
const MIB: usize = 1 << 20;

/// Cases per test unless `PROPTEST_CASES` says otherwise; fixed seed unless `PROPTEST_RNG_SEED`
/// does. (`ProptestConfig { cases, .. }` alone would ignore the variable.)
fn config(default_cases: u32) -> ProptestConfig {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    ProptestConfig {
        cases: env("PROPTEST_CASES").map_or(default_cases, |n| n.clamp(1, u32::MAX as u64) as u32),
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0x00ed_9ead_a975)),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation meter: the peak bytes a call holds at once, counted per thread so that tests
// running in parallel do not see each other's allocations.

mod meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn record(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only
    // touches const-initialised thread-locals, which never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let ptr = unsafe { System.alloc(layout) };
            if !ptr.is_null() {
                record(layout.size() as isize);
            }
            ptr
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let ptr = unsafe { System.alloc_zeroed(layout) };
            if !ptr.is_null() {
                record(layout.size() as isize);
            }
            ptr
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            record(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let new = unsafe { System.realloc(ptr, layout, new_size) };
            if !new.is_null() {
                record(new_size as isize - layout.size() as isize);
            }
            new
        }
    }

    /// Runs `f`; returns its result and the most bytes it held allocated at once.
    pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(start));
        let result = f();
        let peak = PEAK.with(Cell::get);
        (result, (peak - start).max(0) as usize)
    }
}

#[global_allocator]
static ALLOCATOR: meter::Counting = meter::Counting;

#[test]
fn the_allocation_meter_sees_what_a_call_holds_at_once() {
    let ((), peak) = meter::peak(|| {
        let big = vec![1u8; 8 * MIB];
        drop(std::hint::black_box(big));
        let small = vec![1u8; MIB];
        drop(std::hint::black_box(small));
    });
    assert!((8 * MIB..9 * MIB).contains(&peak), "{peak}");
}

// ---------------------------------------------------------------------------------------------
// Shared strategies.

/// Strings that parsers trip over: empty, long, unicode, control characters, numbers, paths.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,12}",
        "(?s).{0,24}",
        "[a-zA-Z0-9+/=_.:-]{0,40}",
        select(vec![
            "",
            " ",
            "source",
            "0",
            "-0",
            "1",
            "-1",
            "1e3",
            "9223372036854775807",
            "9223372036854775808",
            "ft-tail",
            "ft-tail+prior",
            "recommended+alg",
            "+",
            "A",
            "../../etc/passwd",
            "a/b",
            "\u{0}",
            "\n",
            "edgeadapt.command/1",
            "AAEC",
            "AAE",
            "====",
            "*",
        ])
        .prop_map(String::from),
    ]
}

/// Any JSON value, with integers at the edges of i64/u64 and odd strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(vec![i64::MIN, -1, 0, 1, i64::MAX]).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        odd_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(odd_string(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bytes to replace, insert or flip: a uniform index into a container and a value.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
    Overwrite(Index, Vec<u8>),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(i, x)| ByteEdit::Flip(i, x)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        1 => any::<Index>().prop_map(ByteEdit::Delete),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| ByteEdit::Overwrite(i, b)),
    ]
}

fn apply_byte_edits(bytes: &mut Vec<u8>, edits: &[ByteEdit]) {
    for edit in edits {
        if bytes.is_empty() {
            return;
        }
        match edit {
            ByteEdit::Flip(i, x) => {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            ByteEdit::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            ByteEdit::Delete(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            ByteEdit::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            ByteEdit::Overwrite(i, new) => {
                let start = i.index(bytes.len());
                for (slot, b) in bytes[start..].iter_mut().zip(new) {
                    *slot = *b;
                }
            }
        }
    }
}

/// Line-level edits of a TOML file: what a person or a bad sync does to a config.
#[derive(Debug, Clone)]
enum LineEdit {
    Delete(Index),
    ReplaceValue(Index, String),
    Duplicate(Index),
    Insert(Index, String),
    Swap(Index, Index),
    Truncate(Index),
}

/// Values that are wrong in type, range or syntax for some key of a config or a manifest.
fn toml_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "\"\"",
            "\"x\"",
            "0",
            "-1",
            "1",
            "3",
            "4096",
            "4097",
            "65536",
            "4294967296",
            "9223372036854775807",
            "18446744073709551615",
            "-9223372036854775809",
            "1e309",
            "nan",
            "-inf",
            "-0.0",
            "0.5",
            "2.0",
            "true",
            "[]",
            "[[]]",
            "[\"cpu\", \"cpu\"]",
            "[\"gpu\"]",
            "[\"tensorrt\"]",
            "[0, 0, 0]",
            "[1e40, 1, 1]",
            "{}",
            "{ a = 1 }",
            "\"0.0.0.0:1\"",
            "\"[::1]:1883\"",
            "\"127.0.0.1:0\"",
            "\"localhost:80\"",
            "\"mqtts://h:8883\"",
            "\"mqtt://:1\"",
            "\"mqtt://h:99999\"",
            "\"embedded\"",
            "\"NHWC\"",
            "\"rgb\"",
            "\"center-crop\"",
            "\"linear\"",
            "\"../x\"",
            "\"/abs/path\"",
            "1979-05-27T07:32:00Z",
            "'''multi\nline'''",
            "\"\\u0000\"",
            "\"a b\"",
            "\"unterminated",
            "[",
            "=",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,16}".prop_map(|s| format!("{s:?}")),
        1 => "(?s).{0,16}",
    ]
}

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "[runtime]",
            "[[runtime]]",
            "[mqtt.extra]",
            "[input]",
            "[[tail]]",
            "[checksums]",
            "device_id = \"dup\"",
            "unknown = 1",
            "kind = \"linear\"",
            "\"trunk.onnx\" = \"x\"",
            "a.b.c = 1",
            "[",
            "",
        ])
        .prop_map(String::from),
        ("[a-z_]{1,12}", toml_token()).prop_map(|(k, v)| format!("{k} = {v}")),
        "(?s).{0,40}",
    ]
}

fn line_edit() -> impl Strategy<Value = LineEdit> {
    prop_oneof![
        3 => any::<Index>().prop_map(LineEdit::Delete),
        4 => (any::<Index>(), toml_token()).prop_map(|(i, t)| LineEdit::ReplaceValue(i, t)),
        1 => any::<Index>().prop_map(LineEdit::Duplicate),
        2 => (any::<Index>(), toml_line()).prop_map(|(i, l)| LineEdit::Insert(i, l)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| LineEdit::Swap(a, b)),
        1 => any::<Index>().prop_map(LineEdit::Truncate),
    ]
}

fn apply_line_edits(text: &str, edits: &[LineEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for edit in edits {
        if lines.is_empty() {
            break;
        }
        match edit {
            LineEdit::Delete(i) => {
                lines.remove(i.index(lines.len()));
            }
            LineEdit::ReplaceValue(i, token) => {
                // Prefer lines that set a value; comments and headers make dull targets.
                let settings: Vec<usize> = (0..lines.len()).filter(|&n| lines[n].contains(" = ")).collect();
                let n = if settings.is_empty() { i.index(lines.len()) } else { settings[i.index(settings.len())] };
                lines[n] = match lines[n].split_once('=') {
                    Some((key, _)) => format!("{}= {token}", key),
                    None => token.clone(),
                };
            }
            LineEdit::Duplicate(i) => {
                let n = i.index(lines.len());
                lines.insert(n, lines[n].clone());
            }
            LineEdit::Insert(i, line) => lines.insert(i.index(lines.len() + 1), line.clone()),
            LineEdit::Swap(a, b) => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }
            LineEdit::Truncate(i) => {
                let n = i.index(lines.len());
                let line = &lines[n];
                let cut = line.char_indices().map(|(at, _)| at).nth(line.chars().count() / 2).unwrap_or(0);
                lines[n].truncate(cut);
                lines.truncate(n + 1);
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Fleet commands.

/// A device that trusts `key` (none: it accepts unsigned commands).
fn authority(key: Option<&[u8]>) -> Authority {
    Authority { operators: vec![], hmac_key: key.map(<[u8]>::to_vec), max_validity_ms: 7 * 86_400_000 }
}

/// Signing with the fleet key `key` for [`DEVICE`], valid for a minute.
fn signing(key: &[u8]) -> commands::Signing<'static> {
    let signer: &'static Signer = Box::leak(Box::new(Signer::Hmac(key.to_vec())));
    commands::Signing { signer, to: vec![DEVICE.into()], expires_ms: NOW_MS + 60_000 }
}

/// What `parse` must hold to for any payload: no panic, memory linear in the payload, and an
/// accepted command that really is well-formed (and correctly signed when a key is set).
fn check_command_payload(payload: &[u8], key: Option<&[u8]>) -> Result<(), TestCaseError> {
    let authority = authority(key);
    let verify = commands::Verify { authority: &authority, device: DEVICE, now_ms: NOW_MS };
    let (result, peak) = meter::peak(|| commands::parse(payload, Some(&verify)).map(|p| (p.id, p.command)));
    prop_assert!(peak <= 64 * payload.len() + MIB, "parse held {peak} bytes for a {}-byte payload", payload.len());
    let as_json: Option<Value> = serde_json::from_slice(payload).ok();
    match result {
        Ok((id, command)) => {
            let message: CommandMessage = serde_json::from_slice(payload).expect("an accepted command is well-formed");
            prop_assert_eq!(&id, &message.id);
            prop_assert!(
                !id.is_empty() && id.chars().count() <= 128,
                "accepted id of {} characters",
                id.chars().count()
            );
            prop_assert_eq!(message.schema.as_str(), COMMAND_SCHEMA);
            prop_assert_eq!(command.name(), message.command.as_str());
            if let Some(key) = key {
                let expected = Signer::Hmac(key.to_vec()).sign(&message);
                let given = message.signature.as_deref().and_then(|s| s.strip_prefix("hmac-sha256:"));
                let given = given.and_then(|s| hex::decode(s).ok());
                let expected = hex::decode(expected.strip_prefix("hmac-sha256:").unwrap()).ok();
                prop_assert_eq!(given, expected, "accepted without the right signature");
                prop_assert!(message.to.iter().any(|to| to == DEVICE), "accepted for another device");
                prop_assert!(message.expires_ms.is_some_and(|e| e >= NOW_MS - 120_000), "accepted expired");
            }
            if let Command::Label { image, .. } = &command {
                prop_assert!(image.len() <= 16 * MIB);
            }
        }
        Err(refusal) => {
            prop_assert!(!refusal.error.is_empty());
            // The sender gets its answer: a refusal carries the id whenever the payload has one.
            if let Some(id) = as_json.as_ref().and_then(|v| v.get("id")).and_then(Value::as_str) {
                prop_assert_eq!(refusal.id.as_str(), id);
            }
        }
    }
    Ok(())
}

fn method_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "source",
            "ft-head",
            "ft-head-seen",
            "ft-tail",
            "adapter",
            "recommended",
            "ft-tail+prior",
            "ft-tail+alg",
            "ft-head+pcv+distill-unseen",
            "adapter+lolsgd+wise",
            "distill-all",
            "ft-tail+prior-recall+distill-all",
        ])
        .prop_map(String::from),
        "(ft-tail|adapter|source|recommended)?(\\+(alg|prior|pcv|wise|lolsgd|distill-all|distill-unseen|bogus)){0,3}",
        odd_string(),
    ]
}

/// Argument objects for some command: known keys with right, wrong or odd values, and strays.
fn command_args() -> impl Strategy<Value = Value> {
    let known = prop_oneof![
        method_name().prop_map(|m| ("method".to_string(), Value::String(m))),
        prop_oneof![
            select(vec!["source", "0", "1", "-3", "yesterday", "1.5", "9223372036854775808"]).prop_map(Value::from),
            json_value()
        ]
        .prop_map(|v| ("to".to_string(), v)),
        json_value().prop_map(|v| ("after_new_labels".to_string(), v)),
        prop_oneof![any::<u64>().prop_map(Value::from), json_value()].prop_map(|v| ("every_minutes".to_string(), v)),
        odd_string().prop_map(|c| ("class".to_string(), Value::String(c))),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            prop::collection::vec(any::<u8>(), 0..48)
                .prop_map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)),
            odd_string(),
        ]
        .prop_map(|s| ("image_base64".to_string(), Value::String(s))),
        odd_string().prop_map(|n| ("name".to_string(), Value::String(n))),
        prop_oneof![any::<i64>().prop_map(Value::from), json_value()].prop_map(|v| ("version".to_string(), v)),
        (odd_string(), json_value()),
    ];
    prop::collection::vec(known, 0..4).prop_map(|entries| Value::Object(entries.into_iter().collect()))
}

/// Argument objects for `command`: its own keys, each usually present, with values mostly of the
/// right type (in or out of range) and sometimes of any type, and now and then a stray key.
fn args_for(command: &'static str) -> BoxedStrategy<Value> {
    fn typed<S: Strategy<Value = Value> + 'static>(right: S) -> BoxedStrategy<Value> {
        prop_oneof![3 => right, 1 => json_value()].boxed()
    }
    let method = || typed(method_name().prop_map(Value::from));
    let fields: Vec<(&str, BoxedStrategy<Value>)> = match command {
        "adapt" => vec![("method", method())],
        "rollback" => vec![(
            "to",
            typed(prop_oneof![
                select(vec!["source", "0", "1", "42", "-3", "yesterday", "1.5", "9223372036854775808"])
                    .prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
            ]),
        )],
        "set-policy" => vec![
            ("method", method()),
            ("after_new_labels", typed(any::<u32>().prop_map(Value::from))),
            ("every_minutes", typed(any::<u64>().prop_map(Value::from))),
        ],
        "label" => vec![
            ("class", typed(odd_string().prop_map(Value::from))),
            (
                "image_base64",
                typed(prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..48)
                        .prop_map(|b| Value::from(base64::engine::general_purpose::STANDARD.encode(b))),
                    odd_string().prop_map(Value::from),
                ]),
            ),
            ("name", typed(odd_string().prop_map(Value::from))),
        ],
        "publish-weights" => vec![("version", typed(any::<i64>().prop_map(Value::from)))],
        "adopt" => vec![(
            "transfer",
            typed(prop_oneof!["[0-9a-f]{32}".prop_map(Value::from), odd_string().prop_map(Value::from)]),
        )],
        "offer" => {
            let hex = |len: usize| {
                proptest::string::string_regex(&format!("[0-9a-f]{{{len}}}")).unwrap().prop_map(Value::from)
            };
            vec![
                (
                    "schema",
                    typed(prop_oneof![Just(Value::from("edgeadapt.transfer/1")), odd_string().prop_map(Value::from)]),
                ),
                ("transfer", typed(hex(32))),
                ("kind", typed(select(vec!["bundle", "weights", "model"]).prop_map(Value::from))),
                ("name", typed(odd_string().prop_map(Value::from))),
                ("total_bytes", typed(any::<u64>().prop_map(Value::from))),
                ("chunk_bytes", typed(any::<u64>().prop_map(Value::from))),
                ("chunk_sha256", typed(prop::collection::vec(hex(64), 0..4).prop_map(Value::from))),
                ("sha256", typed(hex(64))),
            ]
        }
        _ => vec![],
    };
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .into_iter()
        .map(|(key, value)| {
            prop::option::weighted(0.8, value).prop_map(move |v| v.map(|v| (key.to_string(), v))).boxed()
        })
        .collect();
    (fields, prop::option::weighted(0.1, (odd_string(), json_value())))
        .prop_map(|(fields, stray)| Value::Object(fields.into_iter().flatten().chain(stray).collect()))
        .boxed()
}

fn command_id() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-zA-Z0-9-]{1,16}",
        4 => "\\PC{0,40}",
        1 => (120usize..140).prop_map(|n| "x".repeat(n)),
        1 => (30usize..40).prop_map(|n| "é".repeat(n * 2)),
        1 => Just(String::new()),
    ]
}

/// A JSON object shaped like a command, with fields mutated, missing or of the wrong type, and
/// a signature that is right (for its own id, command and args), wrong, or absent.
fn command_shaped_payload() -> impl Strategy<Value = Vec<u8>> {
    let schema = prop_oneof![
        20 => Just(Value::from(COMMAND_SCHEMA)),
        1 => odd_string().prop_map(Value::from),
        1 => json_value(),
    ];
    let id = prop_oneof![20 => command_id().prop_map(Value::from), 1 => json_value()];
    let command_and_args = prop_oneof![
        20 => select(COMMAND_NAMES.to_vec()).prop_flat_map(|name| {
            (Just(Value::from(name)), prop_oneof![6 => args_for(name), 1 => command_args(), 1 => json_value()])
        }),
        1 => (odd_string().prop_map(Value::from), command_args()),
        1 => (json_value(), json_value()),
    ];
    let signature = prop_oneof![
        12 => Just(Signature::Right),
        2 => Just(Signature::Absent),
        2 => "[0-9a-f]{64}".prop_map(Signature::Text),
        2 => "[0-9a-fA-F]{0,70}".prop_map(Signature::Text),
        1 => json_value().prop_map(Signature::Json),
    ];
    let present = prop::array::uniform5(prop::bool::weighted(0.97));
    let extra = prop::option::weighted(0.1, (odd_string(), json_value()));
    (schema, id, command_and_args, signature, present, extra).prop_map(
        |(schema, id, (command, args), signature, present, extra)| {
            let mut object = serde_json::Map::new();
            let right = match (&id, &command) {
                (Value::String(id), Value::String(command)) => {
                    let message = commands::build(id, command, args.clone(), Some(&signing(COMMAND_KEY)));
                    object.insert("to".into(), json!(message.to));
                    object.insert("expires_ms".into(), json!(message.expires_ms));
                    message.signature
                }
                _ => None,
            };
            for (keep, key, value) in [
                (present[0], "schema", schema),
                (present[1], "id", id),
                (present[2], "command", command),
                (present[3], "args", args),
            ] {
                if keep {
                    object.insert(key.into(), value);
                }
            }
            let signature = match signature {
                Signature::Right => right.map(Value::String),
                Signature::Absent => None,
                Signature::Text(text) => Some(Value::String(text)),
                Signature::Json(value) => Some(value),
            };
            if let Some(signature) = signature.filter(|_| present[4]) {
                object.insert("signature".into(), signature);
            }
            if let Some((key, value)) = extra {
                object.insert(key, value);
            }
            serde_json::to_vec(&Value::Object(object)).unwrap()
        },
    )
}

#[derive(Debug, Clone)]
enum Signature {
    Right,
    Absent,
    Text(String),
    Json(Value),
}

/// A valid command: the id, the command name, its args and what `parse` must make of them.
fn valid_command() -> impl Strategy<Value = (String, &'static str, Value, Command)> {
    let id = "\\PC{1,32}";
    let valid_method = select(vec!["ft-tail", "ft-tail+prior", "recommended", "adapter+wise", "ft-head-seen+alg"]);
    let command = prop_oneof![
        prop::option::of(valid_method.clone()).prop_map(|method| {
            let args = method.map_or(json!({}), |m| json!({ "method": m }));
            ("adapt", args, Command::Adapt { method: method.map(String::from), force: false })
        }),
        prop_oneof![
            Just((json!({ "to": "source" }), VersionRef::Source)),
            Just((json!({ "to": 0 }), VersionRef::Source)),
            (1..=i64::MAX).prop_map(|n| (json!({ "to": n }), VersionRef::Id(n))),
            (1..=i64::MAX).prop_map(|n| (json!({ "to": n.to_string() }), VersionRef::Id(n))),
        ]
        .prop_map(|(args, to)| ("rollback", args, Command::Rollback { to })),
        prop_oneof![Just(Value::Null), Just(json!({}))].prop_map(|args| ("status", args, Command::Status)),
        // Within the documented ranges: at most 10^9 labels, at most ten years.
        (prop::option::of(valid_method), prop::option::of(0usize..=1_000_000_000), prop::option::of(0u64..=5_256_000))
            .prop_map(|(method, after_new_labels, every_minutes)| {
                let update = PolicyUpdate { method: method.map(String::from), after_new_labels, every_minutes };
                ("set-policy", serde_json::to_value(&update).unwrap(), Command::SetPolicy(update))
            }),
        ("\\PC{0,12}", prop::option::of("\\PC{0,12}"), prop::collection::vec(any::<u8>(), 0..200)).prop_map(
            |(class, name, image)| {
                let mut args = json!({
                    "class": class,
                    "image_base64": base64::engine::general_purpose::STANDARD.encode(&image),
                });
                if let Some(name) = &name {
                    args["name"] = json!(name);
                }
                // The default name needs the id; filled in by the caller.
                ("label", args, Command::Label { class, name: name.unwrap_or_default(), image })
            }
        ),
        prop::option::of(any::<i64>()).prop_map(|version| {
            let args = version.map_or(json!({}), |v| json!({ "version": v }));
            ("publish-weights", args, Command::PublishWeights { version })
        }),
    ];
    (id, command).prop_map(|(id, (name, args, mut command))| {
        if let Command::Label { name: label, .. } = &mut command
            && args.get("name").is_none()
        {
            *label = format!("command {id}");
        }
        (id, name, args, command)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_command_payloads_are_refused_without_panicking(
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_command_payload(&payload, None)?;
        check_command_payload(&payload, Some(COMMAND_KEY))?;
    }

    #[test]
    fn arbitrary_json_command_payloads_are_refused_without_panicking(value in json_value()) {
        let payload = serde_json::to_vec(&value).unwrap();
        check_command_payload(&payload, None)?;
        check_command_payload(&payload, Some(COMMAND_KEY))?;
    }

    #[test]
    fn command_shaped_payloads_with_mutated_fields_are_accepted_only_when_well_formed(
        payload in command_shaped_payload(),
        edits in prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(byte_edit(), 1..3)],
    ) {
        let mut payload = payload;
        apply_byte_edits(&mut payload, &edits);
        check_command_payload(&payload, None)?;
        check_command_payload(&payload, Some(COMMAND_KEY))?;
    }

    #[test]
    fn signed_commands_round_trip_through_build_and_parse(
        (id, name, args, expected) in valid_command(),
        key in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let parse = |payload: &[u8], key: Option<&[u8]>| {
            let authority = authority(key);
            let verify = commands::Verify { authority: &authority, device: DEVICE, now_ms: NOW_MS };
            commands::parse(payload, Some(&verify)).map(|p| (p.id, p.command))
        };
        let message = commands::build(&id, name, args.clone(), Some(&signing(&key)));
        let payload = serde_json::to_vec(&message).unwrap();
        prop_assert_eq!(parse(&payload, Some(&key)), Ok((id.clone(), expected.clone())));
        prop_assert_eq!(parse(&payload, None), Ok((id.clone(), expected.clone())));
        let unsigned = serde_json::to_vec(&commands::build(&id, name, args, None)).unwrap();
        prop_assert_eq!(parse(&unsigned, None), Ok((id.clone(), expected)));
        let refusal = parse(&unsigned, Some(&key)).unwrap_err();
        prop_assert!(refusal.error.contains("not signed"), "{}", refusal.error);
        let mut other_key = key.clone();
        other_key.push(1);
        let refusal = parse(&payload, Some(&other_key)).unwrap_err();
        prop_assert_eq!(refusal.id, id);
        prop_assert!(refusal.error.contains("bad signature"), "{}", refusal.error);
    }

    /// Flipping any byte of a signed payload (its signature, its args, or anywhere) either gets it
    /// refused or leaves a payload that means exactly the same command: tampering never passes.
    #[test]
    fn tampered_signed_commands_are_refused_or_unchanged(
        (id, name, args, expected) in valid_command(),
        region in 0..3u8,
        at in any::<Index>(),
        xor in 1..=255u8,
    ) {
        let message = commands::build(&id, name, args.clone(), Some(&signing(COMMAND_KEY)));
        let mut payload = serde_json::to_vec(&message).unwrap();
        let signature = message.signature.clone().unwrap();
        let span = match region {
            0 => {
                let start = find(&payload, signature.as_bytes()).unwrap();
                start..start + signature.len()
            }
            1 => {
                let text = serde_json::to_vec(&args).unwrap();
                let start = find(&payload, b"\"args\":").unwrap() + b"\"args\":".len();
                start..start + text.len()
            }
            _ => 0..payload.len(),
        };
        let i = span.start + at.index(span.len());
        payload[i] ^= xor;
        let authority = authority(Some(COMMAND_KEY));
        let verify = commands::Verify { authority: &authority, device: DEVICE, now_ms: NOW_MS };
        let result = commands::parse(&payload, Some(&verify)).map(|p| (p.id, p.command));
        if let Ok((got_id, command)) = result {
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(command, expected);
        }
        check_command_payload(&payload, Some(COMMAND_KEY))?;
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Any manifest an offer can carry is checked without panicking, and once it passes, any
    /// bytes sent as any chunk are checked without panicking and accepted only if they are the
    /// chunk the manifest lists.
    #[test]
    fn transfer_manifests_and_chunks_are_checked_without_panicking(
        total_bytes in prop_oneof![any::<u64>(), 0u64..5000],
        chunk_bytes in prop_oneof![any::<u64>(), 0u64..3000],
        chunks in prop::collection::vec(any::<[u8; 32]>(), 0..6),
        index in any::<usize>(),
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
    ) {
        use edgeadapt::protocol::transfer::{ArtefactKind, TRANSFER_SCHEMA, TransferLimits, TransferManifest};
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let manifest = TransferManifest {
            schema: TRANSFER_SCHEMA.into(),
            transfer: sha256[..32].to_string(),
            kind: ArtefactKind::Bundle,
            name: "fuzz".into(),
            total_bytes,
            chunk_bytes,
            chunk_sha256: chunks.iter().map(hex::encode).collect(),
            sha256,
            meta: Value::Null,
        };
        let limits = TransferLimits { max_bytes: 1 << 20, max_packet: 4096 };
        if manifest.check(&limits).is_ok() {
            let index = index % (manifest.chunks() + 2);
            if manifest.verify_chunk(index, &bytes).is_ok() {
                prop_assert_eq!(hex::encode(Sha256::digest(&bytes)), manifest.chunk_sha256[index].clone());
            }
        }
    }
}

#[test]
fn deeply_nested_and_huge_command_payloads_are_refused_without_overflowing() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(commands::parse(deep.as_bytes(), None).is_err());
    let deep_args = format!(
        r#"{{"schema":"{COMMAND_SCHEMA}","id":"1","command":"status","args":{}1{}}}"#,
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    // Refused, though without its id: the fallback that recovers the id of a malformed command
    // hits serde_json's recursion limit too, so the sender gets no answer to this one.
    assert!(commands::parse(deep_args.as_bytes(), None).is_err());
    let long_id = "i".repeat(1 << 20);
    let payload =
        serde_json::to_vec(&commands::build(&long_id, "status", json!({}), Some(&signing(COMMAND_KEY)))).unwrap();
    let authority = authority(Some(COMMAND_KEY));
    let verify = commands::Verify { authority: &authority, device: DEVICE, now_ms: NOW_MS };
    let (refusal, peak) = meter::peak(|| commands::parse(&payload, Some(&verify)).unwrap_err());
    assert!(refusal.error.contains("1 to 128"), "{}", refusal.error);
    assert!(peak < 16 * payload.len(), "{peak} bytes held for a {}-byte payload", payload.len());
    // A label image just over the limit is refused before it is decoded.
    let image = "A".repeat((16 << 20) / 3 * 4 + 8);
    let payload =
        serde_json::to_vec(&commands::build("big", "label", json!({"class": "A", "image_base64": image}), None))
            .unwrap();
    let refusal = commands::parse(&payload, None).unwrap_err();
    assert!(refusal.error.contains("exceeds"), "{}", refusal.error);
}

// ---------------------------------------------------------------------------------------------
// 2. Device config.

fn check_config(text: &str) -> Result<(), TestCaseError> {
    for base in [Path::new("/etc/edgeadapt"), Path::new("relative/dir"), Path::new("")] {
        let (result, peak) = meter::peak(|| DeviceConfig::parse(text, base));
        prop_assert!(peak <= 256 * text.len() + MIB, "parse held {peak} bytes for {} bytes of text", text.len());
        let Ok(config) = result else { continue };
        // Whatever passed validation holds the documented invariants...
        prop_assert!(!config.device_id.is_empty() && config.device_id.len() <= 64);
        prop_assert!(config.device_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        prop_assert!(!config.runtime.providers.is_empty());
        prop_assert!((1..=1024).contains(&config.runtime.gpu_batch));
        prop_assert!(config.labelling.validation_every >= 2);
        prop_assert!(config.mqtt.max_packet_bytes >= 4096);
        if base.is_absolute() {
            prop_assert!(config.bundle.is_absolute(), "{:?}", config.bundle);
            // ...and, with its paths resolved, serialises to a config that parses back equal.
            let again = toml::to_string(&config).map_err(|e| TestCaseError::fail(format!("serialise: {e}")))?;
            let reparsed = DeviceConfig::parse(&again, Path::new("/elsewhere"))
                .map_err(|e| TestCaseError::fail(format!("{e:?} in\n{again}")))?;
            prop_assert_eq!(reparsed, config);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_config_text_is_refused_without_panicking(text in "(?s).{0,300}") {
        check_config(&text)?;
    }

    #[test]
    fn mutated_default_config_is_refused_or_valid_without_panicking(
        edits in prop::collection::vec(line_edit(), 1..5),
    ) {
        check_config(&apply_line_edits(DEFAULT_CONFIG, &edits))?;
    }

    #[test]
    fn config_with_random_byte_damage_is_refused_or_valid_without_panicking(
        edits in prop::collection::vec(byte_edit(), 1..4),
    ) {
        let mut bytes = DEFAULT_CONFIG.as_bytes().to_vec();
        apply_byte_edits(&mut bytes, &edits);
        check_config(&String::from_utf8_lossy(&bytes))?;
    }
}

#[test]
fn the_shipped_default_config_parses_and_round_trips() {
    let config = DeviceConfig::parse(DEFAULT_CONFIG, Path::new("/etc/edgeadapt")).unwrap();
    assert_eq!(config.device_id, "edgeadapt-dev");
    check_config(DEFAULT_CONFIG).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Bundle manifests.

fn check_manifest_text(text: &str) -> Result<(), TestCaseError> {
    let (result, peak) = meter::peak(|| Manifest::parse(text));
    prop_assert!(peak <= 256 * text.len() + MIB, "parse held {peak} bytes for {} bytes of text", text.len());
    let Ok(manifest) = result else { return Ok(()) };
    let valid = manifest.validate();
    // Whatever parsed serialises, and its serialisation is a fixed point.
    let toml = manifest.to_toml();
    let reparsed = Manifest::parse(&toml).map_err(|e| TestCaseError::fail(format!("{e} in\n{toml}")))?;
    prop_assert_eq!(reparsed.to_toml(), toml);
    prop_assert_eq!(reparsed.validate(), valid.clone());
    if valid.is_ok() {
        prop_assert_eq!(&reparsed, &manifest);
        let input = &manifest.input;
        prop_assert!((1..=4096).contains(&input.height) && (1..=4096).contains(&input.width));
        prop_assert!(input.mean.len() == input.channels as usize && input.std.iter().all(|s| *s > 0.0));
        for file in manifest.referenced_files() {
            prop_assert!(!file.contains('/') && !file.contains('\\') && !file.starts_with('.') && !file.is_empty());
            prop_assert!(manifest.checksums.contains_key(file));
        }
    }
    Ok(())
}

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_-]{1,10}\\.(onnx|safetensors)", "[\\p{L}0-9_-][\\p{L}0-9 _.-]{0,10}"]
}

fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
        -4.0f32..4.0,
        select(vec![0.485f32, 0.229, 0.5, 1.0, 255.0]),
    ]
}

/// Manifests that pass `validate`, with arbitrary strings wherever the format allows them.
fn valid_manifest() -> impl Strategy<Value = Manifest> {
    let input = (
        select(vec![1u32, 3]),
        select(vec![Layout::Nchw, Layout::Nhwc]),
        select(vec![ColorMode::Grayscale, ColorMode::Rgb, ColorMode::Bgr]),
        select(vec![ResizePolicy::Stretch, ResizePolicy::CenterCrop]),
        (1..=4096u32, 1..=4096u32),
        prop::collection::vec((finite_f32(), finite_f32()), 3),
        "\\PC{1,12}",
    )
        .prop_map(|(channels, layout, color, resize, (height, width), mean_std, tensor)| {
            let color = if channels == 1 { ColorMode::Grayscale } else { color };
            let (mean, std): (Vec<f32>, Vec<f32>) = mean_std
                .into_iter()
                .take(channels as usize)
                .map(|(m, s)| (m, if s.abs() > 0.0 { s.abs() } else { 1.0 }))
                .unzip();
            InputContract { tensor, layout, height, width, channels, color, resize, mean, std }
        });
    let kinds = vec![
        TailLayerKind::Linear,
        TailLayerKind::Conv1x1,
        TailLayerKind::Relu,
        TailLayerKind::Relu6,
        TailLayerKind::Silu,
        TailLayerKind::Sigmoid,
        TailLayerKind::GlobalAvgPool,
        TailLayerKind::Flatten,
    ];
    let layer = (select(kinds), "(?s).{0,12}", file_name(), "\\PC{1,8}", "\\PC{1,8}").prop_map(
        |(kind, name, weights, weight, bias)| {
            if kind.has_weights() {
                TailLayerSpec { kind, name, weights: Some(weights), weight: Some(weight), bias: Some(bias) }
            } else {
                TailLayerSpec { kind, name, weights: None, weight: None, bias: None }
            }
        },
    );
    let classes = prop::collection::btree_set("[\\PC&&\\S]\\PC{0,6}", 1..12);
    (
        ("\\PC{0,4}[a-z]", "(?s).{0,40}"),
        input,
        (file_name(), "\\PC{1,10}", prop::collection::vec(1usize..100_000, 1..5)),
        prop::collection::vec(layer, 0..5),
        (file_name(), classes),
        prop::option::of((file_name(), "(?s).{0,20}")),
        prop::option::of(("(?s).{0,20}", "(?s).{0,20}", "(?s).{0,20}")),
        prop::collection::btree_map("\\PC{0,12}", "[0-9a-fA-F]{64}|\\PC{0,8}", 0..3),
        "[0-9a-fA-F]{64}",
    )
        .prop_map(|((name, description), input, trunk, tail, head, reference, provenance, extra, sum)| {
            let mut manifest = Manifest {
                format_version: 1,
                name,
                description,
                input,
                trunk: TrunkSpec { file: trunk.0, output: trunk.1, output_shape: trunk.2 },
                tail,
                head: HeadSpec { file: head.0, classes: head.1.into_iter().collect() },
                reference: reference.map(|(file, description)| ReferenceSpec { file, description }),
                provenance: provenance.map(|(source, licence, notes)| Provenance { source, licence, notes }),
                checksums: extra,
            };
            let files: Vec<String> = manifest.referenced_files().into_iter().map(String::from).collect();
            for file in files {
                manifest.checksums.insert(file, sum.clone());
            }
            manifest
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_manifest_text_is_refused_without_panicking(text in "(?s).{0,300}") {
        check_manifest_text(&text)?;
    }

    #[test]
    fn mutated_bundled_manifest_is_refused_or_valid_without_panicking(
        edits in prop::collection::vec(line_edit(), 1..5),
    ) {
        check_manifest_text(&apply_line_edits(BUNDLED_MANIFEST, &edits))?;
    }

    #[test]
    fn manifest_with_random_byte_damage_is_refused_or_valid_without_panicking(
        edits in prop::collection::vec(byte_edit(), 1..4),
    ) {
        let mut bytes = BUNDLED_MANIFEST.as_bytes().to_vec();
        apply_byte_edits(&mut bytes, &edits);
        check_manifest_text(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn valid_manifests_round_trip_through_to_toml(manifest in valid_manifest()) {
        prop_assert_eq!(manifest.validate(), Ok(()));
        let text = manifest.to_toml();
        let parsed = Manifest::parse(&text).map_err(|e| TestCaseError::fail(format!("{e} in\n{text}")))?;
        prop_assert_eq!(&parsed, &manifest);
        check_manifest_text(&text)?;
    }
}

#[test]
fn the_bundled_manifest_parses_validates_and_round_trips() {
    let manifest = Manifest::parse(BUNDLED_MANIFEST).unwrap();
    manifest.validate().unwrap();
    assert_eq!(Manifest::parse(&manifest.to_toml()).unwrap(), manifest);
}

// ---------------------------------------------------------------------------------------------
// 4. Weights reassembly.

fn weights_manifest(total_bytes: usize, chunk_bytes: usize, chunks: usize, sha256: String) -> WeightsManifest {
    WeightsManifest {
        schema: WEIGHTS_SCHEMA.into(),
        device: "d".into(),
        version: 1,
        parent: Some(0),
        method: "recommended".into(),
        bundle: "b".into(),
        dtype: "f16".into(),
        tensors: vec![],
        params: json!({}),
        total_bytes,
        chunk_bytes,
        chunks,
        sha256,
    }
}

/// Sizes and counts a manifest may claim: small, at the limits, and absurd.
fn size_claim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..6,
        1 => 0usize..300_000,
        1 => select(vec![99_999usize, 100_000, 100_001, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, usize::MAX]),
        1 => any::<usize>(),
    ]
}

fn index_claim(chunks: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0..chunks.saturating_add(2).max(1), 1 => any::<usize>(), 1 => Just(usize::MAX)]
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn packet_size() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..4096, select(vec![0usize, 512, 1536, 1537, 2048, 262_144, usize::MAX])]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_weights_manifests_and_chunks_are_refused_without_unbounded_allocation(
        schema in prop_oneof![3 => Just(WEIGHTS_SCHEMA.to_string()), 1 => odd_string()],
        (total_bytes, chunk_bytes, chunks) in (size_claim(), size_claim(), size_claim()),
        sha256 in prop_oneof!["[0-9a-f]{64}", odd_string()],
        adds in prop::collection::vec((index_claim(8), prop::collection::vec(any::<u8>(), 0..64)), 0..12),
    ) {
        let mut manifest = weights_manifest(total_bytes, chunk_bytes, chunks, sha256);
        manifest.schema = schema;
        let (result, peak) = meter::peak(|| Reassembly::new(manifest.clone()));
        // Slots for at most 100_000 chunks, whatever the manifest claims.
        prop_assert!(peak <= 100_000 * std::mem::size_of::<Option<Vec<u8>>>() + 4096, "{peak} bytes");
        let Ok(mut set) = result else { return Ok(()) };
        prop_assert_eq!(manifest.schema.as_str(), WEIGHTS_SCHEMA);
        prop_assert!((1..=100_000).contains(&chunks) && total_bytes <= 1 << 31);
        prop_assert_eq!(set.missing(), chunks);
        let mut filled = BTreeSet::new();
        let mut parts: Vec<Option<Vec<u8>>> = vec![None; chunks];
        for (index, bytes) in adds {
            let result = set.add(index, bytes.clone());
            // Every chunk but the last is `chunk_bytes` long; the last holds the rest.
            let expected = if index == chunks - 1 { total_bytes - chunk_bytes * (chunks - 1) } else { chunk_bytes };
            let fits = index < chunks && bytes.len() == expected;
            prop_assert_eq!(result.is_ok(), fits, "add({}, {} bytes) to a set of {} chunks", index, bytes.len(), chunks);
            if fits {
                filled.insert(index);
                parts[index] = Some(bytes);
            }
            prop_assert_eq!(set.missing(), chunks - filled.len());
            match set.assemble() {
                None => prop_assert!(filled.len() < chunks),
                Some(result) => {
                    let whole: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
                    let matches = whole.len() == total_bytes && sha_hex(&whole) == manifest.sha256;
                    prop_assert_eq!(result.is_ok(), matches);
                    if let Ok(payload) = result {
                        prop_assert_eq!(payload, whole);
                    }
                }
            }
        }
    }

    #[test]
    fn chunked_weights_reassemble_in_any_order(
        (payload, max_packet, order) in (prop::collection::vec(any::<u8>(), 1..12_000), packet_size())
            .prop_flat_map(|(payload, max_packet)| {
                let chunks = payload.len().div_ceil(max_packet.saturating_sub(weights::PACKET_OVERHEAD).max(1024));
                (Just(payload), Just(max_packet), Just((0..chunks).collect::<Vec<usize>>()).prop_shuffle())
            }),
        duplicate in prop::option::of(any::<Index>()),
    ) {
        let (manifest, chunks) = weights::chunk(&payload, max_packet, |chunk_bytes, chunks, sha256| {
            weights_manifest(payload.len(), chunk_bytes, chunks, sha256)
        });
        let chunk_bytes = manifest.chunk_bytes;
        prop_assert_eq!(chunk_bytes, max_packet.saturating_sub(weights::PACKET_OVERHEAD).max(1024));
        prop_assert_eq!(manifest.chunks, payload.len().div_ceil(chunk_bytes));
        prop_assert_eq!(chunks.len(), manifest.chunks);
        prop_assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= chunk_bytes));
        prop_assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() == chunk_bytes));
        prop_assert_eq!(&manifest.sha256, &sha_hex(&payload));
        let mut set = Reassembly::new(manifest).unwrap();
        let duplicate = duplicate.map(|d| d.index(order.len()));
        for (n, &index) in order.iter().enumerate() {
            prop_assert!(set.assemble().is_none());
            set.add(index, chunks[index].to_vec()).unwrap();
            if duplicate == Some(n) {
                // A second delivery of the same chunk changes nothing.
                set.add(index, chunks[index].to_vec()).unwrap();
            }
        }
        prop_assert_eq!(set.missing(), 0);
        prop_assert_eq!(set.assemble(), Some(Ok(payload)));
    }

    #[test]
    fn damaged_or_misplaced_chunks_fail_the_size_or_checksum_check(
        payload in prop::collection::vec(any::<u8>(), 1..6_000),
        max_packet in packet_size(),
        damage in (any::<Index>(), any::<Index>(), any::<Index>(), 0..4u8, 1..=255u8),
    ) {
        let (manifest, chunks) = weights::chunk(&payload, max_packet, |chunk_bytes, chunks, sha256| {
            weights_manifest(payload.len(), chunk_bytes, chunks, sha256)
        });
        let mut parts: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let (at, other, byte, kind, xor) = damage;
        let i = at.index(parts.len());
        match kind {
            0 => {
                let j = byte.index(parts[i].len());
                parts[i][j] ^= xor;
            }
            1 => {
                parts[i].pop();
            }
            2 => parts[i].push(xor),
            _ => {
                let j = other.index(parts.len());
                parts.swap(i, j);
            }
        }
        let whole: Vec<u8> = parts.concat();
        let mut set = Reassembly::new(manifest).unwrap();
        let mut added = true;
        for (index, part) in parts.into_iter().enumerate() {
            added &= set.add(index, part).is_ok();
        }
        if !added {
            // A chunk of the wrong size is refused as it arrives.
            prop_assert!(whole != payload);
            return Ok(());
        }
        let result = set.assemble().unwrap();
        prop_assert_eq!(result.is_ok(), whole == payload, "{:?}", result.as_ref().err());
    }

    #[test]
    fn chunks_larger_than_the_manifest_declares_are_refused(
        chunks in 1usize..8,
        extra in 1usize..4096,
    ) {
        let chunk_bytes = 1024;
        let total = chunks * chunk_bytes;
        let manifest = weights_manifest(total, chunk_bytes, chunks, sha_hex(&vec![0; total]));
        let mut set = Reassembly::new(manifest).unwrap();
        let size = chunk_bytes + extra;
        prop_assert!(set.add(0, vec![0; size]).is_err(), "a {size}-byte chunk was kept");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Image decoding.

/// Limits small enough that the largest image they allow decodes quickly in a debug build.
const TIGHT: DecodeLimits =
    DecodeLimits { max_file_bytes: 1 << 20, max_width: 2048, max_height: 2048, max_alloc_bytes: 8 << 20 };

/// What `decode_bytes` must hold to for any input: no panic, an error that names the file, and
/// allocations within the limits (plus a margin for the decoders' own tables and row buffers).
fn check_decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Option<DynamicImage>, TestCaseError> {
    let (result, peak) = meter::peak(|| decode_bytes("input.img", bytes, limits));
    let budget = limits.max_alloc_bytes as usize + 2 * bytes.len() + 4 * MIB;
    prop_assert!(peak <= budget, "decoding {} bytes held {peak} bytes (budget {budget})", bytes.len());
    match result {
        Ok(image) => {
            prop_assert!(image.width() <= limits.max_width && image.height() <= limits.max_height);
            prop_assert!(image.as_bytes().len() as u64 <= limits.max_alloc_bytes);
            Ok(Some(image))
        }
        Err(error) => {
            prop_assert!(error.to_string().starts_with("input.img: "), "{error}");
            let magic = bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.starts_with(&[0xff, 0xd8, 0xff]);
            if bytes.is_empty() {
                prop_assert!(matches!(error, ImageInputError::Empty { .. }), "{error}");
            } else if !magic && bytes.len() as u64 <= limits.max_file_bytes {
                prop_assert!(matches!(error, ImageInputError::UnknownFormat { .. }), "{error}");
            }
            Ok(None)
        }
    }
}

/// A small image of `kind` (0..8: L8, La8, Rgb8, Rgba8, L16, La16, Rgb16, Rgba16) whose pixels
/// come from `seed`.
fn test_image(kind: u8, width: u32, height: u32, seed: &[u8]) -> DynamicImage {
    let n = (width * height) as usize;
    let byte = |i: usize| seed[i % seed.len()].wrapping_add((i / seed.len()) as u8).wrapping_mul(31);
    let word = |i: usize| u16::from_le_bytes([byte(2 * i), byte(2 * i + 1)]);
    let bytes = |channels: usize| (0..n * channels).map(byte).collect::<Vec<u8>>();
    let words = |channels: usize| (0..n * channels).map(word).collect::<Vec<u16>>();
    match kind % 8 {
        0 => DynamicImage::ImageLuma8(ImageBuffer::<Luma<u8>, _>::from_raw(width, height, bytes(1)).unwrap()),
        1 => DynamicImage::ImageLumaA8(ImageBuffer::<LumaA<u8>, _>::from_raw(width, height, bytes(2)).unwrap()),
        2 => DynamicImage::ImageRgb8(ImageBuffer::<Rgb<u8>, _>::from_raw(width, height, bytes(3)).unwrap()),
        3 => DynamicImage::ImageRgba8(ImageBuffer::<Rgba<u8>, _>::from_raw(width, height, bytes(4)).unwrap()),
        4 => DynamicImage::ImageLuma16(ImageBuffer::<Luma<u16>, _>::from_raw(width, height, words(1)).unwrap()),
        5 => DynamicImage::ImageLumaA16(ImageBuffer::<LumaA<u16>, _>::from_raw(width, height, words(2)).unwrap()),
        6 => DynamicImage::ImageRgb16(ImageBuffer::<Rgb<u16>, _>::from_raw(width, height, words(3)).unwrap()),
        _ => DynamicImage::ImageRgba16(ImageBuffer::<Rgba<u16>, _>::from_raw(width, height, words(4)).unwrap()),
    }
}

fn png_bytes(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

fn jpeg_bytes(image: &DynamicImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(image).unwrap();
    out
}

/// A valid PNG or JPEG of a random small image.
fn valid_image_file() -> impl Strategy<Value = Vec<u8>> {
    (0..8u8, 1..40u32, 1..40u32, prop::collection::vec(any::<u8>(), 1..64), prop::option::of(1..=100u8)).prop_map(
        |(kind, width, height, seed, jpeg_quality)| match jpeg_quality {
            Some(quality) => jpeg_bytes(&test_image(if kind % 2 == 0 { 0 } else { 2 }, width, height, &seed), quality),
            None => png_bytes(&test_image(kind, width, height, &seed)),
        },
    )
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of `data` in stored (uncompressed) blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A PNG whose header claims `width` x `height` with `depth` and `color` (PNG codes), followed
/// by `idat` as its only image data.
fn png_claiming(width: u32, height: u32, depth: u8, color: u8, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[depth, color, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &header);
    png_chunk(&mut out, b"IDAT", idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A minimal progressive JPEG claiming `width` x `height` with `components` (1 or 3): a DC
/// scan of `scan_bytes` zero bytes (each bit a zero DC difference), then the end marker.
fn progressive_jpeg_claiming(width: u16, height: u16, components: u8, scan_bytes: usize) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    // Quantisation table 0, all ones.
    out.extend_from_slice(&[0xff, 0xdb, 0, 67, 0]);
    out.extend_from_slice(&[1; 64]);
    // SOF2: progressive, 8-bit.
    out.extend_from_slice(&[0xff, 0xc2]);
    out.extend_from_slice(&(8 + 3 * u16::from(components)).to_be_bytes());
    out.push(8);
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&width.to_be_bytes());
    out.push(components);
    for id in 1..=components {
        out.extend_from_slice(&[id, 0x11, 0]);
    }
    // DC Huffman table 0: a single one-bit code for category 0.
    out.extend_from_slice(&[0xff, 0xc4, 0, 20, 0x00, 1]);
    out.extend_from_slice(&[0; 15]);
    out.push(0);
    // SOS: DC first scan of every component.
    out.extend_from_slice(&[0xff, 0xda]);
    out.extend_from_slice(&(6 + 2 * u16::from(components)).to_be_bytes());
    out.push(components);
    for id in 1..=components {
        out.extend_from_slice(&[id, 0x00]);
    }
    out.extend_from_slice(&[0, 0, 0]);
    out.extend(std::iter::repeat_n(0u8, scan_bytes));
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

/// Rewrites the frame header of a JPEG to claim `width` x `height`.
fn jpeg_with_claimed_size(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let mut sof = 2;
    while !matches!(jpeg[sof + 1], 0xc0..=0xc2) {
        sof += 2 + usize::from(u16::from_be_bytes([jpeg[sof + 2], jpeg[sof + 3]]));
    }
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// PNG colour types with the bit depths each allows.
const PNG_FORMATS: [(u8, u8); 15] = [
    (0, 1),
    (0, 2),
    (0, 4),
    (0, 8),
    (0, 16),
    (2, 8),
    (2, 16),
    (3, 1),
    (3, 8),
    (4, 8),
    (4, 16),
    (6, 8),
    (6, 16),
    (9, 8),
    (2, 3),
];

fn dimension_claim() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => 1u32..64,
        2 => 1u32..3000,
        1 => select(vec![0u32, 2048, 2049, 12_000, 12_001, 65_535, 65_536, (1 << 31) - 1, 1 << 31, u32::MAX]),
        1 => any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn arbitrary_bytes_are_refused_as_images_without_panicking(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| [b"\x89PNG\r\n\x1a\n".as_slice(), &b].concat()),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| [[0xff, 0xd8, 0xff].as_slice(), &b].concat()),
        ],
    ) {
        check_decode(&bytes, &DecodeLimits::default())?;
        check_decode(&bytes, &TIGHT)?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn valid_png_and_jpeg_files_decode_to_their_size_and_png_is_lossless(
        kind in 0..8u8,
        (width, height) in (1..40u32, 1..40u32),
        seed in prop::collection::vec(any::<u8>(), 1..64),
        quality in 1..=100u8,
    ) {
        let image = test_image(kind, width, height, &seed);
        let decoded = check_decode(&png_bytes(&image), &DecodeLimits::default())?.expect("a valid PNG decodes");
        prop_assert_eq!(decoded.color(), image.color());
        prop_assert_eq!(decoded.as_bytes(), image.as_bytes());
        let jpeg_source = test_image(if kind % 2 == 0 { 0 } else { 2 }, width, height, &seed);
        let decoded = check_decode(&jpeg_bytes(&jpeg_source, quality), &DecodeLimits::default())?
            .expect("a valid JPEG decodes");
        prop_assert_eq!((decoded.width(), decoded.height()), (width, height));
    }

    #[test]
    fn truncated_or_bit_flipped_images_are_refused_or_decoded_within_the_limits(
        file in valid_image_file(),
        edits in prop::collection::vec(byte_edit(), 1..6),
    ) {
        let mut bytes = file;
        apply_byte_edits(&mut bytes, &edits);
        check_decode(&bytes, &DecodeLimits::default())?;
        check_decode(&bytes, &TIGHT)?;
    }

    #[test]
    fn png_headers_claiming_huge_dimensions_are_refused_within_the_limits(
        (width, height) in (dimension_claim(), dimension_claim()),
        (color, depth) in select(PNG_FORMATS.to_vec()),
        rows in prop_oneof![Just(None), (0usize..4096).prop_map(Some)],
        truncated in any::<bool>(),
    ) {
        // Either no image data at all, or a valid zlib stream of some zero bytes (rows filtered
        // with filter 0): the file is tiny whatever the header claims.
        let idat = rows.map_or_else(Vec::new, |n| zlib_stored(&vec![0; n]));
        let mut bytes = png_claiming(width, height, depth, color, &idat);
        if truncated {
            bytes.truncate(bytes.len() - 12);
        }
        for limits in [DecodeLimits::default(), TIGHT] {
            let decoded = check_decode(&bytes, &limits)?;
            let claimed = u64::from(width) * u64::from(height);
            if width > limits.max_width || height > limits.max_height || claimed > limits.max_alloc_bytes {
                prop_assert!(decoded.is_none(), "{width}x{height} decoded");
            }
        }
    }

    #[test]
    fn jpeg_headers_claiming_huge_dimensions_are_refused_within_tight_limits(
        (width, height) in prop_oneof![(1..=u16::MAX, 1..=u16::MAX), (1..=2048u16, 1..=2048u16)],
        gray in any::<bool>(),
        progressive in any::<bool>(),
        scan_bytes in 0usize..512,
    ) {
        // Progressive files within the pixel limits overrun the allocation limit: see
        // progressive_jpegs_within_the_pixel_limits_stay_within_max_alloc_bytes.
        let within = u32::from(width) <= TIGHT.max_width && u32::from(height) <= TIGHT.max_height;
        let bytes = if progressive && !within {
            progressive_jpeg_claiming(width, height, if gray { 1 } else { 3 }, scan_bytes)
        } else {
            let small = jpeg_bytes(&test_image(if gray { 0 } else { 2 }, 16, 16, &[7, 9]), 75);
            jpeg_with_claimed_size(small, width, height)
        };
        let decoded = check_decode(&bytes, &TIGHT)?;
        if !within {
            prop_assert!(decoded.is_none(), "{width}x{height} decoded");
        }
    }
}

#[test]
fn png_bombs_are_refused_before_they_are_inflated() {
    // A real bomb: 4000x4000 zero pixels, 16 MB decoded from a few kilobytes.
    let bomb = png_bytes(&DynamicImage::ImageLuma8(ImageBuffer::new(4000, 4000)));
    assert!(bomb.len() < 256 << 10, "{} bytes", bomb.len());
    let limits = DecodeLimits { max_alloc_bytes: 4 << 20, ..DecodeLimits::default() };
    let (result, peak) = meter::peak(|| decode_bytes("bomb.png", &bomb, &limits));
    assert!(matches!(result, Err(ImageInputError::TooLarge { .. })), "{result:?}");
    assert!(peak < MIB, "{peak} bytes held refusing a bomb");
    // Headers beyond the default limits, with no data behind them.
    for (width, height, depth, color) in [(60_000, 60_000, 8, 0), (12_000, 12_000, 16, 6), (u32::MAX, 1, 8, 0)] {
        let bytes = png_claiming(width, height, depth, color, &zlib_stored(&[0; 64]));
        let (result, peak) = meter::peak(|| decode_bytes("claim.png", &bytes, &DecodeLimits::default()));
        assert!(matches!(result, Err(ImageInputError::TooLarge { .. })), "{width}x{height}: {result:?}");
        assert!(peak < MIB, "{width}x{height}: {peak} bytes held");
    }
    let fixture = include_bytes!("fixtures/images/bomb.png");
    let (result, peak) = meter::peak(|| decode_bytes("bomb.png", fixture, &DecodeLimits::default()));
    assert!(matches!(result, Err(ImageInputError::TooLarge { .. })), "{result:?}");
    assert!(peak < MIB, "{peak} bytes held");
}

#[test]
fn jpeg_headers_beyond_the_default_limits_are_refused_before_allocating() {
    let baseline = jpeg_bytes(&test_image(2, 16, 16, &[1, 2, 3]), 80);
    for (width, height) in [(12_001, 16), (16, 12_001), (65_535, 65_535)] {
        for bytes in
            [jpeg_with_claimed_size(baseline.clone(), width, height), progressive_jpeg_claiming(width, height, 3, 64)]
        {
            let (result, peak) = meter::peak(|| decode_bytes("claim.jpg", &bytes, &DecodeLimits::default()));
            assert!(matches!(result, Err(ImageInputError::TooLarge { .. })), "{width}x{height}: {result:?}");
            assert!(peak < MIB, "{width}x{height}: {peak} bytes held");
        }
    }
}

/// `DecodeLimits::max_alloc_bytes` is documented as an upper bound on decoder allocations. A
/// progressive JPEG within the pixel limits makes zune-jpeg allocate its coefficient planes (two
/// bytes per pixel and component) on top of the output buffer the limit was checked against.
#[test]
fn progressive_jpegs_within_the_pixel_limits_stay_within_max_alloc_bytes() {
    let limits = DecodeLimits::default();
    let bytes = progressive_jpeg_claiming(12_000, 12_000, 3, 64);
    let (result, peak) = meter::peak(|| decode_bytes("claim.jpg", &bytes, &limits).map(|i| i.as_bytes().len()));
    assert!(peak as u64 <= limits.max_alloc_bytes + (16 << 20), "{peak} bytes held ({result:?})");
}
