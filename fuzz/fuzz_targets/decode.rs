//! Record framing and decoding: any bytes as one input file (JSON lines, a JSON array, a
//! CloudTrail file, each maybe gzip), decoded in one piece and, like replay, framed into chunks
//! decoded elsewhere. Never a panic; both ways give the same events and dead letters.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use rampart_core::SourcePosition;
use rampart_engine::input::decode::{Decoded, Decoder, Framed};
use rampart_engine::pipeline::config::InputFormat;

fn decoder(format: InputFormat) -> Decoder {
    let (config, schema) = common::config();
    Decoder::new(config.mapping.clone(), schema.clone(), format, config.input)
}

/// (actor, line) of every event, (line, reason) of every dead letter, in order.
fn outcome(items: Vec<Decoded>) -> (Vec<(String, u64)>, Vec<(u64, String)>) {
    let line = |p: &SourcePosition| match p {
        SourcePosition::File { line, .. } => *line,
        _ => 0,
    };
    let (mut events, mut dead) = (Vec::new(), Vec::new());
    for item in items {
        match item {
            Decoded::Batch(b) => {
                assert!(b.batch.num_rows() <= 3, "batch_size is 3");
                for i in 0..b.batch.num_rows() {
                    events.push((b.actor(i).to_string(), line(&b.positions[i])));
                }
            }
            Decoded::DeadLetter(l) => {
                assert!(l.record.len() <= 4096, "dead letters are cut at the record limit");
                dead.push((line(&l.source), l.error));
            }
        }
    }
    (events, dead)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, file)) = data.split_first() else {
        return;
    };
    let format = match control % 4 {
        0 => InputFormat::Auto,
        1 => InputFormat::JsonLines,
        2 => InputFormat::JsonArray,
        _ => InputFormat::CloudTrail,
    };
    let chunk_lines = usize::from(control / 4 % 8) + 1;

    let mut here = Vec::new();
    let mut d = decoder(format);
    d.decode_bytes("input", file, &mut |o| here.push(o)).expect("in memory");
    d.flush(&mut |o| here.push(o));
    let here = outcome(here);

    let mut framed = Vec::new();
    let mut framer = decoder(format).chunking(chunk_lines);
    framer.frame_bytes("input", file, &mut |f| framed.push(f)).expect("in memory");
    framer.flush(&mut |o| framed.push(Framed::Decoded(o)));
    let mut worker = decoder(format);
    let mut chunked = Vec::new();
    for item in framed {
        match item {
            Framed::Lines(chunk) => worker.decode_chunk(&chunk, &mut |o| chunked.push(o)),
            Framed::Decoded(o) => chunked.push(o),
            Framed::Progress(_) => {}
        }
    }
    worker.flush(&mut |o| chunked.push(o));
    assert_eq!(outcome(chunked), here, "chunked decoding differs");
});
