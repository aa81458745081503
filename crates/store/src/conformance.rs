//! The behaviour every backend must show, run against each one.

use bytes::Bytes;

use crate::ObjectStore;

/// Exercises the whole [`ObjectStore`] contract on an empty store.
pub async fn run(store: &dyn ObjectStore) {
    assert!(store.list("generations/").await.unwrap().is_empty(), "a new store lists nothing");
    assert!(store.get("generations/x/missing").await.unwrap_err().is_not_found());
    store.delete("generations/x/missing").await.expect("deleting a missing key is not an error");

    let keys = [
        "generations/b/wal/00000001_00000000.wal.lz4",
        "generations/a/snapshots/00000000.snapshot.lz4",
        "generations/b/wal/00000000_00000000.wal.lz4",
        "other/file",
    ];
    for (i, key) in keys.iter().enumerate() {
        store.put(key, Bytes::from(vec![i as u8; i + 1])).await.unwrap();
    }
    let listed = store.list("generations/").await.unwrap();
    let listed_keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(
        listed_keys,
        [
            "generations/a/snapshots/00000000.snapshot.lz4",
            "generations/b/wal/00000000_00000000.wal.lz4",
            "generations/b/wal/00000001_00000000.wal.lz4"
        ],
        "sorted, recursive, prefix-filtered"
    );
    assert_eq!(listed[2].size, 1);
    let narrow = store.list("generations/b/wal/").await.unwrap();
    assert_eq!(narrow.len(), 2);

    store.put(keys[0], Bytes::from_static(b"replaced")).await.unwrap();
    assert_eq!(&store.get(keys[0]).await.unwrap()[..], b"replaced", "put overwrites");

    store.delete(keys[0]).await.unwrap();
    assert!(store.get(keys[0]).await.unwrap_err().is_not_found());
    assert_eq!(store.list("generations/b/").await.unwrap().len(), 1);

    store.put("generations/d/wal/00000000_00000000.wal.lz4", Bytes::from_static(b"1")).await.unwrap();
    store.put("generations/d/snapshots/00000000.snapshot.lz4", Bytes::from_static(b"2")).await.unwrap();
    assert_eq!(store.delete_prefix("generations/d/").await.unwrap(), 2, "a generation's every object");
    assert!(store.list("generations/d/").await.unwrap().is_empty());
    assert_eq!(store.list("generations/b/").await.unwrap().len(), 1, "other generations stay");

    // Compare-and-swap, as a lease uses it.
    let lease = "walstream-lease";
    assert!(store.get_versioned(lease).await.unwrap().is_none());
    let v1 = store.put_if(lease, Bytes::from_static(b"a"), None).await.unwrap();
    assert!(
        matches!(
            store.put_if(lease, Bytes::from_static(b"b"), None).await,
            Err(crate::Error::PreconditionFailed { .. })
        ),
        "create-only fails once it exists"
    );
    let (body, read_version) = store.get_versioned(lease).await.unwrap().unwrap();
    assert_eq!((&body[..], read_version), (&b"a"[..], v1));
    let v2 = store.put_if(lease, Bytes::from_static(b"c"), Some(v1)).await.unwrap();
    assert_ne!(v1, v2);
    assert!(
        matches!(
            store.put_if(lease, Bytes::from_static(b"d"), Some(v1)).await,
            Err(crate::Error::PreconditionFailed { .. })
        ),
        "a stale version fails"
    );
    assert_eq!(&store.get_versioned(lease).await.unwrap().unwrap().0[..], b"c", "and writes nothing");
    assert!(
        store.list("generations/").await.unwrap().iter().all(|m| !m.key.contains("lease")),
        "the lease is not under generations/"
    );
    store.delete(lease).await.unwrap();

    // put_file: small, and large enough for a backend to stream it in several chunks.
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [100usize, (20 << 20) + 12345].into_iter().enumerate() {
        let path = dir.path().join("upload");
        let body: Vec<u8> = (0..len).map(|j| (j * 7 + j / 4096 + i) as u8).collect();
        std::fs::write(&path, &body).unwrap();
        let key = format!("generations/c/snapshots/{i:08x}.snapshot.lz4");
        store.put_file(&key, &path).await.unwrap();
        assert!(store.get(&key).await.unwrap() == body, "put_file of {len} bytes must store them all");
        assert_eq!(
            store.list("generations/c/").await.unwrap().iter().find(|m| m.key == key).map(|m| m.size),
            Some(len as u64)
        );
        // Ranges, as a restore streams a large snapshot: inside, at the end, and past it.
        for (offset, range_len) in [(0, 10), (len as u64 / 3, 4096), (len as u64 - 7, 7), (len as u64 - 7, 100)] {
            let got = store.get_range(&key, offset, range_len).await.unwrap();
            let end = (offset + range_len).min(len as u64) as usize;
            assert!(got == body[offset as usize..end], "get_range({offset}, {range_len}) of {len} bytes");
            // Into a buffer that held something else and is longer or shorter than the range.
            for reused in [vec![0xa5u8; 1 << 20], vec![0x5a; 3]] {
                let got = store.get_range_into(&key, offset, range_len, reused[..].into()).await.unwrap();
                assert!(got == body[offset as usize..end], "get_range_into({offset}, {range_len}) of {len} bytes");
            }
        }
    }
    assert!(store.get_range("generations/x/missing", 0, 10).await.unwrap_err().is_not_found());
}
