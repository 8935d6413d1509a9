//! The connection reader: arbitrary bytes as everything a client sends after the upgrade (see
//! `pubgate::fuzzing::read_connection` for what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pubgate::fuzzing::read_connection(data));
