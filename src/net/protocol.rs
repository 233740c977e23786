//! `/codex/blockexc/1.0.0`: Codex's block exchange wire protocol.
//!
//! A stream carries frames: an unsigned-varint length, then one protobuf `Message`.
//! Frames over [`MAX_MESSAGE_BYTES`] are refused (Codex allows 100 MiB; a peer must not
//! make us buffer that much). The schema, as Codex writes it:
//!
//! ```text
//! Message        { 1: Wantlist  3: repeated BlockDelivery  4: repeated BlockPresence
//!                  5: pendingBytes varint  6: AccountMessage { 1: address bytes }
//!                  7: StateChannelUpdate { 1: update bytes } }
//! Wantlist       { 1: repeated Entry  2: full bool }
//! Entry          { 1: BlockAddress  2: priority int32  3: cancel bool
//!                  4: wantType (0 WantBlock, 1 WantHave)  5: sendDontHave bool }
//! BlockAddress   { 1: leaf bool; leaf: 2: treeCid bytes, 3: index varint;
//!                  otherwise: 4: cid bytes }
//! BlockDelivery  { 1: cid bytes  2: data bytes  3: BlockAddress  4: CodexProof bytes }
//! BlockPresence  { 1: BlockAddress  2: type (0 Have, 1 DontHave)  3: price bytes }
//! ```
//!
//! Meaning: WantHave asks whether a peer has a block (answered by a presence, DontHave
//! only when `sendDontHave`); WantBlock asks for the block itself (answered by a
//! delivery; leaf deliveries carry their inclusion proof); `cancel` withdraws a want.
//! Codex always writes fields 1, 5, 6 and 7 of a Message; so does the encoder here, and
//! the decoder accepts them absent. Account and state-channel fields are read and ignored.
//! The decoder turns any malformed input into an error, never a panic.

use bytes::Bytes;
use cid::Cid;

use crate::cids::cid_from_bytes;
use crate::error::{Error, Result};
use crate::protobuf::{
    get_varint, len_field_size, put_len_header, put_varint, Reader, Value, Writer,
};

pub const PROTOCOL: &str = "/codex/blockexc/1.0.0";
/// The largest frame accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
const WHAT: &str = "blockexc message";

/// Where a block sits: by CID (manifests, lone blocks) or as leaf `index` of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockAddress {
    Cid(Cid),
    Leaf { tree: Cid, index: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WantType {
    Block,
    Have,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub address: BlockAddress,
    pub priority: i32,
    pub cancel: bool,
    pub want: WantType,
    pub send_dont_have: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wantlist {
    pub entries: Vec<Entry>,
    pub full: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDelivery {
    pub cid: Cid,
    pub data: Bytes,
    pub address: BlockAddress,
    /// Encoded CodexProof, for leaf addresses.
    pub proof: Option<Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Have,
    DontHave,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPresence {
    pub address: BlockAddress,
    pub presence: Presence,
    pub price: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub wantlist: Wantlist,
    pub deliveries: Vec<BlockDelivery>,
    pub presences: Vec<BlockPresence>,
    pub pending_bytes: u64,
}

fn address_writer(a: &BlockAddress) -> Writer {
    let mut w = Writer::new();
    match a {
        BlockAddress::Leaf { tree, index } => {
            w.bool_field(1, true)
                .bytes_field(2, &tree.to_bytes())
                .varint_field(3, *index);
        }
        BlockAddress::Cid(cid) => {
            w.bool_field(1, false).bytes_field(4, &cid.to_bytes());
        }
    }
    w
}

fn decode_address(bytes: &[u8]) -> Result<BlockAddress> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut leaf, mut tree, mut index, mut cid) = (false, None, None, None);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => leaf = v.as_u64(WHAT, "address.leaf")? != 0,
            2 => tree = Some(cid_from_bytes(v.as_bytes(WHAT, "address.treeCid")?, WHAT)?),
            3 => index = Some(v.as_u64(WHAT, "address.index")?),
            4 => cid = Some(cid_from_bytes(v.as_bytes(WHAT, "address.cid")?, WHAT)?),
            _ => {}
        }
    }
    if leaf {
        Ok(BlockAddress::Leaf {
            tree: tree.ok_or_else(|| Error::malformed(WHAT, "leaf address without treeCid"))?,
            index: index.unwrap_or(0),
        })
    } else {
        Ok(BlockAddress::Cid(cid.ok_or_else(|| {
            Error::malformed(WHAT, "address without cid")
        })?))
    }
}

fn flag(v: &Value<'_>, field: &str) -> Result<bool> {
    Ok(v.as_u64(WHAT, field)? != 0)
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let parts = Parts::of(self);
        let mut out = Vec::with_capacity(parts.body_len());
        parts.write_body(&mut out);
        out
    }

    /// Decodes one message; `data` fields share `bytes`' buffer.
    pub fn decode(bytes: &Bytes) -> Result<Self> {
        let mut msg = Message::default();
        let mut r = Reader::new(bytes, WHAT);
        while let Some((field, v)) = r.next_field()? {
            match field {
                1 => msg.wantlist = decode_wantlist(v.as_bytes(WHAT, "wantlist")?)?,
                3 => msg
                    .deliveries
                    .push(decode_delivery(bytes, v.as_bytes(WHAT, "delivery")?)?),
                4 => msg
                    .presences
                    .push(decode_presence(v.as_bytes(WHAT, "presence")?)?),
                5 => msg.pending_bytes = v.as_u64(WHAT, "pendingBytes")?,
                6 | 7 => {
                    v.as_bytes(WHAT, "account")?;
                }
                _ => {}
            }
        }
        Ok(msg)
    }

    pub fn is_empty(&self) -> bool {
        self.wantlist.entries.is_empty() && self.deliveries.is_empty() && self.presences.is_empty()
    }
}

fn decode_wantlist(bytes: &[u8]) -> Result<Wantlist> {
    let mut wl = Wantlist::default();
    let mut r = Reader::new(bytes, WHAT);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => {
                let mut er = Reader::new(v.as_bytes(WHAT, "entry")?, WHAT);
                let (mut address, mut priority, mut cancel, mut want, mut sdh) =
                    (None, 0i32, false, WantType::Block, false);
                while let Some((f, ev)) = er.next_field()? {
                    match f {
                        1 => address = Some(decode_address(ev.as_bytes(WHAT, "entry.address")?)?),
                        2 => priority = ev.as_u64(WHAT, "entry.priority")? as i64 as i32,
                        3 => cancel = flag(&ev, "entry.cancel")?,
                        4 => {
                            want = match ev.as_u64(WHAT, "entry.wantType")? {
                                0 => WantType::Block,
                                1 => WantType::Have,
                                other => {
                                    return Err(Error::malformed(
                                        WHAT,
                                        format!("want type {other}"),
                                    ))
                                }
                            }
                        }
                        5 => sdh = flag(&ev, "entry.sendDontHave")?,
                        _ => {}
                    }
                }
                wl.entries.push(Entry {
                    address: address
                        .ok_or_else(|| Error::malformed(WHAT, "entry without address"))?,
                    priority,
                    cancel,
                    want,
                    send_dont_have: sdh,
                });
            }
            2 => wl.full = flag(&v, "wantlist.full")?,
            _ => {}
        }
    }
    Ok(wl)
}

/// `outer` is the whole message buffer, so block data can be sliced out of it uncopied.
fn decode_delivery(outer: &Bytes, bytes: &[u8]) -> Result<BlockDelivery> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut cid, mut data, mut address, mut proof) = (None, None, None, None);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => cid = Some(cid_from_bytes(v.as_bytes(WHAT, "delivery.cid")?, WHAT)?),
            2 => data = Some(outer.slice_ref(v.as_bytes(WHAT, "delivery.data")?)),
            3 => address = Some(decode_address(v.as_bytes(WHAT, "delivery.address")?)?),
            4 => proof = Some(outer.slice_ref(v.as_bytes(WHAT, "delivery.proof")?)),
            _ => {}
        }
    }
    let cid = cid.ok_or_else(|| Error::malformed(WHAT, "delivery without cid"))?;
    Ok(BlockDelivery {
        address: address.unwrap_or(BlockAddress::Cid(cid)),
        cid,
        data: data.unwrap_or_default(),
        proof,
    })
}

fn decode_presence(bytes: &[u8]) -> Result<BlockPresence> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut address, mut presence, mut price) = (None, Presence::Have, Bytes::new());
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => address = Some(decode_address(v.as_bytes(WHAT, "presence.address")?)?),
            2 => {
                presence = match v.as_u64(WHAT, "presence.type")? {
                    0 => Presence::Have,
                    1 => Presence::DontHave,
                    other => return Err(Error::malformed(WHAT, format!("presence type {other}"))),
                }
            }
            3 => price = Bytes::copy_from_slice(v.as_bytes(WHAT, "presence.price")?),
            _ => {}
        }
    }
    Ok(BlockPresence {
        address: address.ok_or_else(|| Error::malformed(WHAT, "presence without address"))?,
        presence,
        price,
    })
}

/// A message split for encoding: its small fields encoded, each delivery's data left in
/// place so that it is copied once, into the output.
struct Parts<'a> {
    /// Field 1, the wantlist.
    head: Writer,
    /// Field 3 for each delivery: the fields before its data, the data, the fields after.
    deliveries: Vec<(Writer, &'a [u8], Writer)>,
    /// Fields 4 (presences), 5, 6 and 7.
    tail: Writer,
}

impl<'a> Parts<'a> {
    fn of(m: &'a Message) -> Self {
        let mut wl = Writer::new();
        for e in &m.wantlist.entries {
            let mut ew = Writer::new();
            ew.message_field(1, &address_writer(&e.address))
                .varint_field(2, e.priority as i64 as u64)
                .bool_field(3, e.cancel)
                .varint_field(4, matches!(e.want, WantType::Have) as u64)
                .bool_field(5, e.send_dont_have);
            wl.message_field(1, &ew);
        }
        wl.bool_field(2, m.wantlist.full);
        let mut head = Writer::new();
        head.message_field(1, &wl);
        let deliveries = m
            .deliveries
            .iter()
            .map(|d| {
                let mut before = Writer::new();
                before.bytes_field(1, &d.cid.to_bytes());
                let mut after = Writer::new();
                after.message_field(3, &address_writer(&d.address));
                if let Some(p) = &d.proof {
                    after.bytes_field(4, p);
                }
                (before, &d.data[..], after)
            })
            .collect();
        let mut tail = Writer::new();
        for p in &m.presences {
            let mut pw = Writer::new();
            pw.message_field(1, &address_writer(&p.address))
                .varint_field(2, matches!(p.presence, Presence::DontHave) as u64)
                .bytes_field(3, &p.price);
            tail.message_field(4, &pw);
        }
        tail.varint_field(5, m.pending_bytes);
        tail.message_field(6, &Writer::new())
            .message_field(7, &Writer::new());
        Self {
            head,
            deliveries,
            tail,
        }
    }

    fn delivery_len((before, data, after): &(Writer, &[u8], Writer)) -> usize {
        before.len() + len_field_size(2, data.len()) + after.len()
    }

    fn body_len(&self) -> usize {
        self.head.len()
            + self
                .deliveries
                .iter()
                .map(|d| len_field_size(3, Self::delivery_len(d)))
                .sum::<usize>()
            + self.tail.len()
    }

    fn write_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.head.as_slice());
        for d in &self.deliveries {
            put_len_header(out, 3, Self::delivery_len(d));
            out.extend_from_slice(d.0.as_slice());
            put_len_header(out, 2, d.1.len());
            out.extend_from_slice(d.1);
            out.extend_from_slice(d.2.as_slice());
        }
        out.extend_from_slice(self.tail.as_slice());
    }
}

impl Message {
    /// Appends this message's frame (varint length, then the message, as
    /// [`encode_frame`] makes it) to `out`, copying each delivery's data once: blocks
    /// are the bulk of what peers send.
    pub fn encode_frame_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let parts = Parts::of(self);
        let body = parts.body_len();
        if body > MAX_MESSAGE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "message of {body} bytes is over the frame limit"
            )));
        }
        out.reserve(body + 10);
        put_varint(out, body as u64);
        parts.write_body(out);
        Ok(())
    }
}

/// A frame: varint length, then the message.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    msg.encode_frame_into(&mut out)?;
    Ok(out)
}

/// Frames up to this size (answers are built in messages of at most 1 MiB) get room for
/// all their bytes once [`RESERVE_AFTER_BYTES`] of them have arrived; larger ones grow
/// with what arrives.
const RESERVE_FRAME_BYTES: usize = 2 << 20;
const RESERVE_AFTER_BYTES: usize = 64 << 10;

/// Splits a byte stream into messages, whatever pieces it arrives in. A whole frame is
/// split off the buffer without copying, and deliveries' data point into it.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: bytes::BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        // Once a frame of answer size has shown it is really coming (a first read's worth
        // of it arrived), room for all of it is made at once: growing the buffer read by
        // read copied the frame again at every doubling (the frames before it still hold
        // the old allocation, so it cannot grow in place).
        if let Some((len, n)) = get_varint(&self.buf) {
            let frame = n + len as usize;
            let want = frame.saturating_sub(self.buf.len());
            if len as usize <= RESERVE_FRAME_BYTES
                && self.buf.len() >= RESERVE_AFTER_BYTES.min(frame)
                && want > bytes.len()
            {
                self.buf.reserve(want);
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Whether part of a frame is buffered (a stream that stops here is stalled).
    pub fn is_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Bytes buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `None` if more bytes are needed; an error (oversized or
    /// malformed frame) means the stream is unusable and the peer should be dropped.
    pub fn next_message(&mut self) -> Result<Option<Message>> {
        let Some((len, n)) = get_varint(&self.buf) else {
            if self.buf.len() >= 10 {
                return Err(Error::malformed(WHAT, "bad frame length"));
            }
            return Ok(None);
        };
        if len > MAX_MESSAGE_BYTES as u64 {
            return Err(Error::malformed(
                WHAT,
                format!("frame of {len} bytes is over the limit"),
            ));
        }
        let len = len as usize;
        if self.buf.len() < n + len {
            // The buffer grows with what arrives, not with what the header claims: a
            // peer that announces 4 MiB and sends ten bytes holds ten bytes.
            return Ok(None);
        }
        let mut frame = self.buf.split_to(n + len);
        let frame = frame.split_off(n).freeze();
        Message::decode(&frame).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::{block_cid, cid_from_digest, sha256, ROOT_CODEC};
    use proptest::prelude::*;

    fn sample() -> Message {
        let tree = cid_from_digest(ROOT_CODEC, &sha256(b"tree"));
        let data = Bytes::from(vec![7u8; 1000]);
        Message {
            wantlist: Wantlist {
                entries: vec![
                    Entry {
                        address: BlockAddress::Leaf { tree, index: 3 },
                        priority: -5,
                        cancel: false,
                        want: WantType::Have,
                        send_dont_have: true,
                    },
                    Entry {
                        address: BlockAddress::Cid(block_cid(b"x")),
                        priority: 9,
                        cancel: true,
                        want: WantType::Block,
                        send_dont_have: false,
                    },
                ],
                full: true,
            },
            deliveries: vec![BlockDelivery {
                cid: block_cid(&data),
                data: data.clone(),
                address: BlockAddress::Leaf { tree, index: 0 },
                proof: Some(Bytes::from_static(b"\x08\x12")),
            }],
            presences: vec![BlockPresence {
                address: BlockAddress::Cid(block_cid(b"y")),
                presence: Presence::DontHave,
                price: Bytes::new(),
            }],
            pending_bytes: 42,
        }
    }

    #[test]
    fn messages_round_trip_and_frames_split_anywhere() {
        let m = sample();
        assert_eq!(Message::decode(&Bytes::from(m.encode())).unwrap(), m);
        let empty = Message::default();
        assert_eq!(
            Message::decode(&Bytes::from(empty.encode())).unwrap(),
            empty
        );
        let mut stream = encode_frame(&m).unwrap();
        stream.extend(encode_frame(&empty).unwrap());
        // The single-copy encoder writes the same bytes.
        let mut direct = Vec::new();
        m.encode_frame_into(&mut direct).unwrap();
        empty.encode_frame_into(&mut direct).unwrap();
        assert_eq!(direct, stream);
        for cut in 0..stream.len() {
            let mut d = FrameDecoder::new();
            let mut got = vec![];
            for piece in [&stream[..cut], &stream[cut..]] {
                d.push(piece);
                while let Some(msg) = d.next_message().unwrap() {
                    got.push(msg);
                }
            }
            assert_eq!(got, vec![m.clone(), empty.clone()], "cut at {cut}");
        }
    }

    #[test]
    fn the_largest_block_a_manifest_may_declare_fits_a_frame() {
        // The deepest proof a tree can have (2^64 leaves), and the longest CIDs.
        let tree = cid_from_digest(ROOT_CODEC, &sha256(b"tree"));
        let data = Bytes::from(vec![1u8; crate::manifest::MAX_BLOCK_SIZE as usize]);
        let m = Message {
            deliveries: vec![BlockDelivery {
                cid: block_cid(&data),
                data,
                address: BlockAddress::Leaf {
                    tree,
                    index: u64::MAX,
                },
                proof: Some(Bytes::from(vec![0xffu8; 64 * 40 + 32])),
            }],
            ..Message::default()
        };
        assert!(
            encode_frame(&m).is_ok(),
            "a block of the largest size is sendable"
        );
    }

    #[test]
    fn room_for_a_whole_answer_frame_is_made_once_it_is_really_coming() {
        let data = Bytes::from(vec![3u8; 1 << 20]);
        let frame = encode_frame(&Message {
            deliveries: vec![BlockDelivery {
                cid: crate::cids::block_cid(&data),
                data,
                address: BlockAddress::Cid(crate::cids::block_cid(b"x")),
                proof: None,
            }],
            ..Message::default()
        })
        .unwrap();
        let mut d = FrameDecoder::new();
        d.push(&frame[..100]);
        assert!(
            d.buf.capacity() < 64 << 10,
            "a header alone reserves nothing"
        );
        d.push(&frame[100..RESERVE_AFTER_BYTES]);
        d.push(&frame[RESERVE_AFTER_BYTES..RESERVE_AFTER_BYTES + 1000]);
        assert!(d.buf.capacity() >= frame.len(), "{}", d.buf.capacity());
        let at = d.buf.as_ptr();
        for piece in frame[RESERVE_AFTER_BYTES + 1000..].chunks(64 << 10) {
            d.push(piece);
            assert_eq!(d.buf.as_ptr(), at, "the frame's bytes were not moved");
        }
        assert!(d.next_message().unwrap().is_some());

        // A frame over the reservation size grows with what arrives.
        let mut d = FrameDecoder::new();
        let mut head = Vec::new();
        put_varint(&mut head, (RESERVE_FRAME_BYTES + 1) as u64);
        d.push(&head);
        d.push(&vec![0x0a; RESERVE_AFTER_BYTES]);
        d.push(&[0x0a; 10]);
        assert!(
            d.buf.capacity() < RESERVE_FRAME_BYTES,
            "{}",
            d.buf.capacity()
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_they_are_buffered() {
        let mut d = FrameDecoder::new();
        let mut head = Vec::new();
        put_varint(&mut head, (MAX_MESSAGE_BYTES + 1) as u64);
        d.push(&head);
        assert!(d.next_message().is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Message::decode(&Bytes::from(bytes.clone()));
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            for _ in 0..4 {
                if !matches!(d.next_message(), Ok(Some(_))) { break; }
            }
        }

        #[test]
        fn frames_encode_in_one_copy_and_decode_back(
            sizes in proptest::collection::vec(0usize..70_000, 0..4),
            pending in any::<u64>(),
            index in any::<u64>(),
        ) {
            let mut m = sample();
            m.pending_bytes = pending;
            m.deliveries = sizes
                .iter()
                .map(|&n| {
                    let data = Bytes::from(vec![(n % 251) as u8; n]);
                    BlockDelivery {
                        cid: block_cid(&data),
                        data,
                        address: BlockAddress::Leaf {
                            tree: block_cid(b"t"),
                            index,
                        },
                        proof: (n % 2 == 0).then(|| Bytes::from(vec![1u8; n % 300])),
                    }
                })
                .collect();
            let mut direct = vec![9u8];
            m.encode_frame_into(&mut direct).unwrap();
            prop_assert_eq!(&direct[1..], &encode_frame(&m).unwrap()[..]);
            // And the frame decodes to the message (the decoder is written separately).
            let mut d = FrameDecoder::new();
            d.push(&direct[1..]);
            prop_assert_eq!(d.next_message().unwrap(), Some(m));
        }

        #[test]
        fn mutated_messages_never_panic(pos in 0usize..4096, byte in any::<u8>()) {
            let mut bytes = sample().encode();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = Message::decode(&Bytes::from(bytes));
        }
    }
}
