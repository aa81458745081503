//! What a person sees on bad input: one clear line and a distinct exit code, never a panic,
//! never a partial file.

use crate::harness::*;

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let scratch = Scratch::new();
    let path = scratch.path("notes.txt");
    let text = "these are notes, not a database; walstream must not touch them\n".repeat(4);
    std::fs::write(&path, &text).unwrap();
    let output = walstream(&["replicate", path.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(stderr(&output).contains("is not a SQLite database"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(list_dir(scratch.dir.path()), ["notes.txt"], "no metadata or replica was created");
}

#[test]
fn malformed_replica_urls_are_rejected_with_their_own_code() {
    let scratch = Scratch::new();
    // (A bare path is not a URL but a database path, looked up in the config file.)
    for url in ["ftp://host/x", "file://", "gcs://"] {
        let output = walstream(&["restore", "-o", scratch.path("out.db").to_str().unwrap(), url]);
        assert_eq!(output.status.code(), Some(5), "{url}: {}", stderr(&output));
        assert!(stderr(&output).contains("invalid replica URL"), "{}", stderr(&output));
    }
    assert!(!scratch.path("out.db").exists());
}

on_both_backends! {
    fn restore_from_an_empty_replica_says_no_backup_or_skips_when_asked(backend: Backend) {
        let scratch = Scratch::on(backend);
        let out = scratch.path("out.db");
        let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        assert!(stderr(&output).contains("no matching backups found"));
        let output = walstream(&["restore", "-if-replica-exists", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(list_dir(scratch.dir.path()), Vec::<String>::new());
    }
}

#[test]
fn restore_never_overwrites_and_if_db_not_exists_skips_without_reading_the_replica() {
    let scratch = Scratch::new();
    let out = scratch.path("out.db");
    std::fs::write(&out, "precious").unwrap();
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    // The replica URL points at nothing at all: -if-db-not-exists must not even look.
    let output = walstream(&[
        "restore",
        "-if-db-not-exists",
        "-if-replica-exists",
        "-o",
        out.to_str().unwrap(),
        "file:///nonexistent/replica",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("database already exists, skipping"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
}

/// Replicates a small database and returns the scratch dir holding the replica.
fn replicated(backend: Backend) -> Scratch {
    let scratch = Scratch::on(backend);
    let mut app = App::open(&scratch.db());
    let replicator = scratch.start_replicator();
    for _ in 0..20 {
        app.insert(3);
    }
    replicator.stop_ok();
    scratch
}

/// The key of the replica's first WAL segment that holds frames, not just the WAL header.
fn first_frames_segment(scratch: &Scratch) -> String {
    scratch
        .replica_keys()
        .into_iter()
        .find(|k| k.contains("/wal/") && scratch.read_object(k).len() > 64)
        .expect("a segment with frames")
}

on_both_backends! {
    fn a_corrupt_segment_fails_restore_naming_it_and_leaves_nothing(backend: Backend) {
        let scratch = replicated(backend);
        let segment = first_frames_segment(&scratch);
        let original = scratch.read_object(&segment);
        let content = walstream_format::lz4::decompress(&original).unwrap();
        // A flipped byte in a match offset inside a run of zeros copies the same zeros from
        // elsewhere: the segment still holds the same bytes, and nothing is corrupt. Flip the
        // first byte from the middle on that changes what the segment decodes to.
        let bytes = (original.len() / 2..original.len())
            .map(|at| {
                let mut bytes = original.clone();
                bytes[at] ^= 0x55;
                bytes
            })
            .find(|bytes| walstream_format::lz4::decompress(bytes).ok().as_ref() != Some(&content))
            .expect("some byte of the segment matters");
        scratch.overwrite_object(&segment, &bytes);

        let restore_dir = scratch.path("restore");
        std::fs::create_dir(&restore_dir).unwrap();
        let out = restore_dir.join("out.db");
        let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        let name = segment.rsplit('/').next().unwrap();
        assert!(stderr(&output).contains(name), "the error must name {name}: {}", stderr(&output));
        assert_eq!(list_dir(&restore_dir), Vec::<String>::new(), "no output and no temp files");
    }
}

on_both_backends! {
    fn a_truncated_segment_fails_restore_naming_it_and_leaves_nothing(backend: Backend) {
        let scratch = replicated(backend);
        let segment = first_frames_segment(&scratch);
        let bytes = scratch.read_object(&segment);
        scratch.overwrite_object(&segment, &bytes[..bytes.len() - 10]);
        let out = scratch.path("out.db");
        let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        assert!(stderr(&output).contains(segment.rsplit('/').next().unwrap()), "{}", stderr(&output));
        assert!(!out.exists());
        assert!(list_dir(scratch.dir.path()).iter().all(|n| !n.contains("walstream-restore")), "{:?}", list_dir(scratch.dir.path()));
    }
}
