//! The binary protocol: the frame decoder on any bytes (a decoded cart,
//! encoded again, decodes to the same event), and the appliance's request
//! handling on them (every complete frame gets exactly one answer the
//! client's decoder reads; what is left is an incomplete frame; a bad frame
//! closes with an error answer).
#![no_main]

use cartscore_protocol::{Status, encode_request, parse_request, parse_response};
use libfuzzer_sys::fuzz_target;

#[path = "fixture.rs"]
mod fixture;

const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut frames = 0;
    let mut malformed = false;
    loop {
        match parse_request(rest, MAX_FRAME) {
            Ok(Some((frame, used))) => {
                frames += 1;
                if let Ok(event) = frame.to_event() {
                    let mut again = Vec::new();
                    encode_request(&mut again, frame.request_id, &event);
                    let (decoded, _) = parse_request(&again, MAX_FRAME)
                        .expect("an encoded frame decodes")
                        .expect("an encoded frame is complete");
                    assert_eq!(decoded.to_event().as_ref(), Ok(&event));
                }
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(error) => {
                assert!(!error.reason().is_empty());
                malformed = true;
                break;
            }
        }
    }
    let _ = parse_response(data);

    fixture::FIXTURE.with(|fixture| {
        let handler = fixture.frames.as_ref().expect("the fixture serves TCP");
        let mut input = data.to_vec();
        let mut output = Vec::new();
        let close = handler.answer(&mut input, &mut output);
        assert_eq!(close, malformed);
        let mut answers = Vec::new();
        let mut at = 0;
        while at < output.len() {
            let (answer, used) = parse_response(&output[at..])
                .expect("the server's answer decodes")
                .expect("the server's answer is whole");
            answers.push(answer);
            at += used;
        }
        assert_eq!(answers.len(), frames + usize::from(malformed));
        if close {
            let last = answers.last().expect("a bad frame is answered");
            assert!(matches!(
                last.status,
                Status::MalformedFrame | Status::UnsupportedVersion
            ));
        } else {
            assert_eq!(parse_request(&input, MAX_FRAME), Ok(None));
        }
    });
});
