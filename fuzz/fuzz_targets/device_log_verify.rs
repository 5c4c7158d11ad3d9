#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    roamsync::fuzzing::device_log_verify(data);
});
