//! WAL built by hand for tests: exactly the frames a test needs, chained as SQLite chains them.

/// A WAL SQLite accepts, holding `frames` of (page number, commit size or 0, fill byte). Page 1
/// is `page1` with its in-header size set to its transaction's, as SQLite checks that.
pub(crate) fn synthetic_wal(page_size: u32, salt: u32, page1: &[u8], frames: &[(u32, u32, u8)]) -> Vec<u8> {
    use walstream_format::wal::checksum_update;
    use walstream_format::ByteOrder;
    let mut wal = Vec::new();
    for word in [0x377f_0682u32, 3_007_000, page_size, 0, salt, salt.rotate_left(7)] {
        wal.extend_from_slice(&word.to_be_bytes());
    }
    let mut sum = checksum_update(ByteOrder::Little, (0, 0), &wal);
    wal.extend_from_slice(&sum.0.to_be_bytes());
    wal.extend_from_slice(&sum.1.to_be_bytes());
    for (n, &(pgno, commit, fill)) in frames.iter().enumerate() {
        let mut page = vec![fill; page_size as usize];
        if pgno == 1 {
            let size = frames[n..].iter().map(|f| f.1).find(|c| *c != 0).expect("page 1 in a committed transaction");
            page.copy_from_slice(page1);
            page[28..32].copy_from_slice(&size.to_be_bytes());
        }
        let mut head = Vec::new();
        for word in [pgno, commit, salt, salt.rotate_left(7)] {
            head.extend_from_slice(&word.to_be_bytes());
        }
        sum = checksum_update(ByteOrder::Little, checksum_update(ByteOrder::Little, sum, &head[..8]), &page);
        wal.extend_from_slice(&head);
        wal.extend_from_slice(&sum.0.to_be_bytes());
        wal.extend_from_slice(&sum.1.to_be_bytes());
        wal.extend_from_slice(&page);
    }
    wal
}
