//! One SMTP command line (and the same bytes framed into lines and fed to a session): the
//! parser never panics, borrows from its input, agrees with the reference parser and round-trips
//! its canonical form. See `etrn_relay::smtp::fuzzing::fuzz_command`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    etrn_relay::smtp::fuzzing::fuzz_command(data);
});
