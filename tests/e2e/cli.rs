//! What a person sees on bad input: one clear line and a distinct exit code, never a panic,
//! never a partial file.

use crate::harness::*;

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

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
    for url in ["not-a-url", "ftp://host/x", "file://"] {
        let output = walstream(&["restore", "-o", scratch.path("out.db").to_str().unwrap(), url]);
        assert_eq!(output.status.code(), Some(5), "{url}: {}", stderr(&output));
        assert!(stderr(&output).contains("invalid replica URL"), "{}", stderr(&output));
    }
    assert!(!scratch.path("out.db").exists());
}

#[test]
fn restore_from_an_empty_replica_says_no_backup_or_skips_when_asked() {
    let scratch = Scratch::new();
    let out = scratch.path("out.db");
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("no matching backups found"));
    let output = walstream(&["restore", "-if-replica-exists", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(list_dir(scratch.dir.path()), Vec::<String>::new());
}

#[test]
fn restore_never_overwrites_and_if_db_not_exists_skips_without_reading_the_replica() {
    let scratch = Scratch::new();
    let out = scratch.path("out.db");
    std::fs::write(&out, "precious").unwrap();
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    // The replica URL points at nothing at all: -if-db-not-exists must not even look.
    let output = walstream(&["restore", "-if-db-not-exists", "-if-replica-exists", "-o", out.to_str().unwrap(), "file:///nonexistent/replica"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("database already exists, skipping"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
}

/// Replicates a small database and returns the scratch dir holding the replica.
fn replicated() -> Scratch {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"));
    for _ in 0..20 {
        app.insert(3);
    }
    assert!(replicator.stop().success());
    scratch
}

fn first_segment(scratch: &Scratch) -> std::path::PathBuf {
    let generation = std::fs::read_dir(scratch.path("replica/generations")).unwrap().next().unwrap().unwrap().path();
    let mut segments: Vec<_> = std::fs::read_dir(generation.join("wal")).unwrap().flatten().map(|e| e.path()).collect();
    segments.sort();
    segments.into_iter().next().unwrap()
}

#[test]
fn a_corrupt_segment_fails_restore_naming_it_and_leaves_nothing() {
    let scratch = replicated();
    let segment = first_segment(&scratch);
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();

    let restore_dir = scratch.path("restore");
    std::fs::create_dir(&restore_dir).unwrap();
    let out = restore_dir.join("out.db");
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr(&output).contains(&name), "the error must name {name}: {}", stderr(&output));
    assert_eq!(list_dir(&restore_dir), Vec::<String>::new(), "no output and no temp files");
}

#[test]
fn a_truncated_segment_fails_restore_naming_it_and_leaves_nothing() {
    let scratch = replicated();
    let segment = first_segment(&scratch);
    let bytes = std::fs::read(&segment).unwrap();
    std::fs::write(&segment, &bytes[..bytes.len() - 10]).unwrap();
    let out = scratch.path("out.db");
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(stderr(&output).contains(&*segment.file_name().unwrap().to_string_lossy()), "{}", stderr(&output));
    assert!(!out.exists());
    assert!(list_dir(scratch.dir.path()).iter().all(|n| !n.contains("walstream-restore")), "{:?}", list_dir(scratch.dir.path()));
}
