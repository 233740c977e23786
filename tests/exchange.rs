//! The block exchange without the network: a provider answers wants from a real repo,
//! the answers cross the wire format, and the requester's checks accept honest
//! deliveries and refuse every kind of lie.

use bytes::Bytes;
use codexfs::cids::block_cid;
use codexfs::net::protocol::{
    encode_frame, BlockAddress, Entry, FrameDecoder, Message, Presence, WantType, Wantlist,
};
use codexfs::net::provider::{answer, ANSWER_BYTES};
use codexfs::net::verify::{verify_delivery, Rejected};
use codexfs::node::{Node, NodeConfig};
use rand::{RngCore, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn want(address: BlockAddress, want: WantType, send_dont_have: bool) -> Entry {
    Entry {
        address,
        priority: 0,
        cancel: false,
        want,
        send_dont_have,
    }
}

fn over_the_wire(messages: Vec<Message>) -> Vec<Message> {
    let mut decoder = FrameDecoder::new();
    for m in &messages {
        decoder.push(&encode_frame(m).unwrap());
    }
    let mut out = vec![];
    while let Some(m) = decoder.next_message().unwrap() {
        out.push(m);
    }
    out
}

#[test]
fn wants_are_answered_and_every_delivery_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let data = random(40 * 65536 + 3, 1);
    let mcid = node.store(&data[..], Some("f".into()), None).unwrap();
    let manifest = node.repo().manifest(&mcid).unwrap().unwrap();
    let (tree, n) = (manifest.tree_cid, manifest.block_count());

    let unknown = BlockAddress::Leaf { tree, index: n + 5 };
    let wl = Wantlist {
        entries: vec![
            want(BlockAddress::Leaf { tree, index: 0 }, WantType::Have, false),
            want(unknown.clone(), WantType::Have, true),
            want(
                BlockAddress::Leaf { tree, index: n + 6 },
                WantType::Have,
                false,
            ),
        ],
        full: false,
    };
    let answers = over_the_wire(answer(node.repo(), &wl).unwrap());
    let presences: Vec<_> = answers.iter().flat_map(|m| m.presences.clone()).collect();
    assert_eq!(
        presences.len(),
        2,
        "no answer for an unknown block without sendDontHave"
    );
    assert_eq!(presences[0].presence, Presence::Have);
    assert_eq!(
        (presences[1].address.clone(), presences[1].presence),
        (unknown, Presence::DontHave)
    );

    let mut entries: Vec<_> = (0..n)
        .map(|i| {
            want(
                BlockAddress::Leaf { tree, index: i },
                WantType::Block,
                false,
            )
        })
        .collect();
    entries.push(want(BlockAddress::Cid(mcid), WantType::Block, false));
    let answers = over_the_wire(
        answer(
            node.repo(),
            &Wantlist {
                entries,
                full: true,
            },
        )
        .unwrap(),
    );
    assert!(answers.len() > 1, "40 blocks do not fit one answer");
    let mut rebuilt = Vec::new();
    for m in &answers {
        let bytes: usize = m.deliveries.iter().map(|d| d.data.len()).sum();
        assert!(bytes <= ANSWER_BYTES + 65536);
        for d in &m.deliveries {
            let v = verify_delivery(d, &d.address, n).expect("honest delivery verifies");
            if let BlockAddress::Leaf { .. } = v.address {
                rebuilt.extend_from_slice(&v.data);
            }
        }
    }
    rebuilt.truncate(data.len());
    assert!(rebuilt == data);
}

#[test]
fn lies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let mcid = node.store(&random(5 * 65536, 2)[..], None, None).unwrap();
    let other = node.store(&random(5 * 65536, 3)[..], None, None).unwrap();
    let m = node.repo().manifest(&mcid).unwrap().unwrap();
    let o = node.repo().manifest(&other).unwrap().unwrap();
    let (tree, n) = (m.tree_cid, m.block_count());
    let get = |tree, index| {
        let wl = Wantlist {
            entries: vec![want(
                BlockAddress::Leaf { tree, index },
                WantType::Block,
                false,
            )],
            full: false,
        };
        answer(node.repo(), &wl)
            .unwrap()
            .remove(0)
            .deliveries
            .remove(0)
    };
    let honest = get(tree, 2);
    let addr = honest.address.clone();
    verify_delivery(&honest, &addr, n).unwrap();

    let mut d = honest.clone();
    let mut bytes = d.data.to_vec();
    bytes[100] ^= 1;
    d.data = Bytes::from(bytes);
    assert_eq!(
        verify_delivery(&d, &addr, n),
        Err(Rejected::BadData),
        "wrong bytes"
    );

    let mut d = get(o.tree_cid, 2); // right bytes of another dataset, with their own proof
    d.address = addr.clone();
    assert!(
        matches!(verify_delivery(&d, &addr, n), Err(Rejected::Proof(_))),
        "proof from another tree"
    );

    let mut d = honest.clone();
    d.proof = get(tree, 3).proof; // another leaf's proof
    assert!(matches!(
        verify_delivery(&d, &addr, n),
        Err(Rejected::Proof(_))
    ));

    let mut d = honest.clone();
    d.proof = None;
    assert_eq!(verify_delivery(&d, &addr, n), Err(Rejected::NoProof));

    let mut d = honest.clone();
    d.proof = Some(Bytes::from_static(b"\xff\xff"));
    assert_eq!(verify_delivery(&d, &addr, n), Err(Rejected::BadProof));

    assert!(
        matches!(
            verify_delivery(&honest, &addr, n + 1),
            Err(Rejected::Proof(_))
        ),
        "wrong leaf count"
    );
    let elsewhere = BlockAddress::Leaf { tree, index: 1 };
    assert_eq!(
        verify_delivery(&honest, &elsewhere, n),
        Err(Rejected::WrongAddress)
    );

    // By CID: the bytes must be that CID's.
    let wl = Wantlist {
        entries: vec![want(BlockAddress::Cid(mcid), WantType::Block, false)],
        full: false,
    };
    let mut d = answer(node.repo(), &wl)
        .unwrap()
        .remove(0)
        .deliveries
        .remove(0);
    verify_delivery(&d, &BlockAddress::Cid(mcid), 0).unwrap();
    d.data = Bytes::from_static(b"forged");
    d.cid = block_cid(b"forged");
    assert_eq!(
        verify_delivery(&d, &BlockAddress::Cid(mcid), 0),
        Err(Rejected::WrongCid)
    );
}
