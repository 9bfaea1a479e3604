//! Decoding off the loop's thread. A round's messages are copied out of the consumer
//! ([`Polled`]) and decoded on a thread of their own ([`Decoding`]) into what the loop admits
//! ([`Gathered`]), while the loop runs the detectors on the round before: the two cores of a
//! service draining a backlog both work, as replay's framing and decoding threads do. Rounds
//! come back in the order they were polled (one thread, one queue), each with what the
//! forwarding instances told after its records (marks, commands, guard notes), so nothing is
//! reordered.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rampart_engine::input::decode::{Decoded, Decoder};

use super::source::{Gathered, Letter};

/// One polled message: its input position and where its payload and key are in
/// [`Polled::data`].
struct Message {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    payload: Range<usize>,
    key: Option<Range<usize>>,
}

/// A round's messages, copied out of the consumer, and what came with them.
#[derive(Default)]
pub(super) struct Polled {
    /// The payloads and keys, back to back.
    data: Vec<u8>,
    messages: Vec<Message>,
    /// The round's messages and timestamps counted, the marks, commands and guard notes; the
    /// batches and dead letters are the decoding thread's to add.
    pub(super) gathered: Gathered,
}

impl Polled {
    /// An empty round whose payloads go into `data` (a buffer given back by the decoding
    /// thread).
    pub(super) fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            ..Self::default()
        }
    }

    /// Adds a message to decode (a record at its input position).
    pub(super) fn push(
        &mut self,
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        payload: &[u8],
        key: Option<&[u8]>,
    ) {
        let mut copy = |bytes: &[u8]| {
            let start = self.data.len();
            self.data.extend_from_slice(bytes);
            start..self.data.len()
        };
        let payload = copy(payload);
        let key = key.map(copy);
        self.messages.push(Message {
            topic,
            partition,
            offset,
            payload,
            key,
        });
    }

    /// Messages to decode.
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Bytes of payloads and keys held.
    pub(super) fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Whether the round brought nothing at all (no message, no mark, command or note).
    fn is_empty(&self) -> bool {
        let g = &self.gathered;
        self.messages.is_empty() && g.marks.is_empty() && g.commands.is_empty() && g.guard_notes.is_empty()
    }

    /// Decodes the messages into batches and dead letters; gives back the payload buffer.
    fn decode(self, decoder: &mut Decoder) -> (Gathered, Vec<u8>) {
        let Self {
            data,
            messages,
            mut gathered,
        } = self;
        for m in &messages {
            let payload = &data[m.payload.clone()];
            let key = m.key.clone().map(|k| &data[k]);
            decoder.decode_message(&m.topic, m.partition, m.offset, payload, &mut |d| match d {
                Decoded::Batch(b) => gathered.batches.push(b),
                Decoded::DeadLetter(letter) => gathered.letters.push(Letter {
                    letter,
                    payload: payload.to_vec(),
                    key: key.map(<[u8]>::to_vec),
                }),
            });
        }
        decoder.flush(&mut |d| {
            if let Decoded::Batch(b) = d {
                gathered.batches.push(b);
            }
        });
        (gathered, data)
    }
}

/// What the loop sends the decoding thread.
enum Job {
    Decode(Polled),
    /// The pipeline was reloaded: decode with its mapping from now on.
    Replace(Box<Decoder>),
}

/// The decoding thread, and the rounds sent to it not yet taken back.
pub(super) struct Decoding {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<(Gathered, Vec<u8>)>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
    /// Buffers given back, for the next rounds' payloads.
    spare: Vec<Vec<u8>>,
}

impl Decoding {
    /// Buffers kept for reuse: about the rounds in flight (a freed buffer's pages come back
    /// zeroed by the kernel when allocated again).
    const SPARE: usize = 4;

    /// Starts the decoding thread with `decoder` (as `std::thread::spawn`, panics if the
    /// system cannot start a thread).
    pub(super) fn start(mut decoder: Decoder) -> Self {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rampart-decode".into())
            .spawn(move || {
                for job in inbox {
                    match job {
                        Job::Decode(polled) => {
                            if outbox.send(polled.decode(&mut decoder)).is_err() {
                                return;
                            }
                        }
                        Job::Replace(d) => decoder = *d,
                    }
                }
            })
            .expect("cannot start the decoding thread");
        Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
            spare: Vec::new(),
        }
    }

    /// An empty round, its payload buffer reused when one was given back.
    pub(super) fn round(&mut self) -> Polled {
        Polled::new(self.spare.pop().unwrap_or_default())
    }

    /// Rounds sent and not yet taken back.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Sends a round to be decoded; a round that brought nothing only gives its buffer back.
    pub(super) fn send(&mut self, polled: Polled) {
        if polled.is_empty() {
            self.keep(polled.data);
            return;
        }
        self.post(Job::Decode(polled));
        self.in_flight += 1;
    }

    /// The oldest round sent, decoded (waits for it); `None` when none is in flight.
    pub(super) fn take(&mut self) -> Option<Gathered> {
        if self.in_flight == 0 {
            return None;
        }
        let (gathered, buffer) = self.done.recv().unwrap_or_else(|_| self.thread_died());
        self.in_flight -= 1;
        self.keep(buffer);
        Some(gathered)
    }

    /// Keeps an emptied payload buffer for a next round (up to [`Self::SPARE`]).
    fn keep(&mut self, mut buffer: Vec<u8>) {
        if self.spare.len() < Self::SPARE {
            buffer.clear();
            self.spare.push(buffer);
        }
    }

    /// Decodes the next rounds with `decoder` (after a reload; take the rounds in flight
    /// first, which the old pipeline's mapping decoded).
    pub(super) fn replace(&mut self, decoder: Decoder) {
        debug_assert_eq!(self.in_flight, 0, "rounds in flight belong to the old pipeline");
        self.post(Job::Replace(Box::new(decoder)));
    }

    fn post(&mut self, job: Job) {
        let sent = self
            .jobs
            .as_ref()
            .expect("the decoding thread runs until dropped")
            .send(job);
        if sent.is_err() {
            self.thread_died();
        }
    }

    /// The decoding thread ended early: only a panic does that; it is this thread's panic.
    fn thread_died(&mut self) -> ! {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            _ => panic!("the decoding thread stopped"),
        }
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        // Closing the queue ends the thread.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
