//! The DATA state machine: the first two octets pick the limits, the rest is what a client sends
//! after `354`. Same verdict for every split, terminator exactly where the reference finds it,
//! reference output for valid messages, errors exactly for broken rules. See
//! `etrn_relay::smtp::fuzzing::fuzz_data`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    etrn_relay::smtp::fuzzing::fuzz_data(data);
});
