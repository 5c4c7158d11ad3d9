#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    roamsync::fuzzing::message_decode(data);
});
