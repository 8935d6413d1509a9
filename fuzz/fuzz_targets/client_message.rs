//! The client message parser: arbitrary bytes as one text message (see
//! `pubgate::fuzzing::parse_request` for what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pubgate::fuzzing::parse_request(data));
