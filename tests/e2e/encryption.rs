//! age encryption, configured as Litestream v0.3.13 configures it (an `age` block per replica),
//! against the real litestream both ways: one config file serves both tools.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::*;

/// A fresh X25519 key pair: (recipient `age1…`, identity `AGE-SECRET-KEY-1…`).
pub fn key_pair() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let secret = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_string();
    (identity.to_public().to_string(), secret)
}

/// `walstream.yml` for this database and replica with an age block of `recipient` and
/// `identity` (either may be left out).
fn encrypted_config(scratch: &Scratch, name: &str, recipient: Option<&str>, identity: Option<&str>) -> PathBuf {
    let mut text = format!(
        "dbs:\n  - path: {}\n    replicas:\n      - url: {}\n        age:\n",
        scratch.db().display(),
        scratch.replica_url()
    );
    if let Some(recipient) = recipient {
        text.push_str(&format!("          recipients: [{recipient}]\n"));
    }
    if let Some(identity) = identity {
        // A whole identity file, comment included, as `age-keygen` writes it.
        text.push_str(&format!(
            "          identities:\n            - |\n              # created: by the test\n              {identity}\n"
        ));
    }
    let path = scratch.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A load whose snapshot (10 MiB of random blobs, taken at start) is larger than a GCS
/// upload chunk and a restore's download part, and whose WAL spans a checkpoint.
fn before_start(app: &mut App) {
    app.insert(1);
    app.insert_large(10 << 20);
    app.checkpoint("TRUNCATE");
}

fn load(app: &mut App, checkpoint: &str) {
    for round in 0..4 {
        for _ in 0..20 {
            app.insert(4);
        }
        if round == 1 {
            app.checkpoint(checkpoint);
            app.insert_large(1 << 20);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Every replica object holds no plaintext: each under `generations/` is an age file, and the
/// lease (walstream's own object) is its three lines naming the holder and the expiry.
fn assert_nothing_readable(scratch: &Scratch) {
    let keys = scratch.replica_keys();
    assert!(keys.iter().any(|k| k.contains("/snapshots/")) && keys.iter().any(|k| k.contains("/wal/")), "{keys:?}");
    for key in &keys {
        let body = scratch.read_object(key);
        if key.starts_with("generations/") {
            assert!(
                body.starts_with(b"age-encryption.org/v1\n"),
                "{key} is not an age file: {:?}",
                &body[..body.len().min(32)]
            );
        } else if key == &format!("{}.lock.tmp", walstream_format::name::LEASE_KEY) {
            // A file replica's lock for the lease's compare-and-swap: held, never written.
            assert!(body.is_empty(), "the lease's lock file holds {} bytes", body.len());
        } else {
            assert_eq!(key, walstream_format::name::LEASE_KEY, "an object walstream adds: {keys:?}");
            let text = String::from_utf8(body).expect("the lease is text");
            let lines: Vec<&str> = text.lines().collect();
            assert!(
                lines.len() == 3
                    && lines[0] == "walstream lease v1"
                    && lines[1].starts_with("holder ")
                    && lines[2].starts_with("expires_unix_ms "),
                "the lease holds only who holds it and until when: {text:?}"
            );
        }
    }
}

fn litestream(args: &[OsString]) -> Output {
    with_emulator(&mut Command::new(litestream_bin())).args(args).output().unwrap()
}

/// `litestream replicate -config CONFIG`, logging to `litestream.log`.
fn litestream_replicating(scratch: &Scratch, config: &Path) -> std::process::Child {
    let log = std::fs::File::create(scratch.path("litestream.log")).unwrap();
    with_emulator(&mut Command::new(litestream_bin()))
        .arg("replicate")
        .arg("-config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn walstream_os(args: &[OsString]) -> Output {
    with_emulator(&mut Command::new(walstream_bin())).args(args).output().unwrap()
}

/// What a command printed, both streams (in config mode the daemon logs to stdout).
fn printed(output: &Output) -> String {
    format!("{}{}", stdout(output), stderr(output))
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// A restore that must fail with `code`, its one line containing `says`, leaving nothing.
fn assert_restore_fails(args: &[OsString], out: &Path, code: i32, says: &str) {
    let output = walstream_os(args);
    let err = printed(&output);
    assert_eq!(output.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?} should say {says:?}: {err}");
    assert_eq!(err.trim().lines().filter(|l| l.contains(" ERROR ")).count(), 1, "one error line: {err}");
    let leftovers: Vec<_> = list_dir(out.parent().unwrap()).into_iter().filter(|n| n.contains("out.db")).collect();
    assert!(leftovers.is_empty(), "a failed restore left {leftovers:?}");
}

on_both_backends! {
    fn litestream_restores_what_walstream_encrypted(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (recipient, identity) = key_pair();
        let config = encrypted_config(&scratch, "litestream.yml", Some(&recipient), Some(&identity));
        let mut app = App::open(&scratch.db());
        before_start(&mut app);
        let replicator = Replicator::start_args(&os(&[&"-config", &config]), scratch.path("replicate.log"), &[]);
        wait_for_snapshot(&scratch);
        load(&mut app, "TRUNCATE");
        replicator.stop_ok();
        // A restart resumes the generation: it reads the last segment back, through age.
        let replicator = Replicator::start_args(&os(&[&"-config", &config]), scratch.path("replicate.log"), &[]);
        app.insert(3);
        replicator.stop_ok();
        assert_eq!(scratch.generation_count(), 1, "the restart resumed: {:?}", scratch.replica_keys());
        assert_nothing_readable(&scratch);

        // The same config file, given to litestream.
        let by_litestream = scratch.path("by-litestream.db");
        let output = litestream(&os(&[&"restore", &"-config", &config, &"-o", &by_litestream, &scratch.db()]));
        assert!(output.status.success(), "litestream restore failed: {}", stderr(&output));
        assert_same_database(&scratch.db(), &by_litestream);

        let by_walstream = scratch.path("by-walstream.db");
        let output = walstream_os(&os(&[&"restore", &"-config", &config, &"-o", &by_walstream, &scratch.db()]));
        assert!(output.status.success(), "walstream restore failed: {}", stderr(&output));
        assert_same_database(&scratch.db(), &by_walstream);
        let output = walstream_os(&os(&[&"verify", &"-config", &config, &scratch.db()]));
        assert!(output.status.success(), "walstream verify failed: {}", stderr(&output));

        // Without the identity, or with another one, nothing is restored, and the line says why.
        let out = scratch.path("out.db");
        assert_restore_fails(&os(&[&"restore", &"-o", &out, &scratch.replica_url()]), &out, 18, "no age identity is configured");
        let (_, stranger) = key_pair();
        let wrong = encrypted_config(&scratch, "wrong.yml", None, Some(&stranger));
        assert_restore_fails(&os(&[&"restore", &"-config", &wrong, &"-o", &out, &scratch.db()]), &out, 18, "none of the configured age.identities");
    }
}

on_both_backends! {
    fn walstream_restores_what_litestream_encrypted(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (recipient, identity) = key_pair();
        let config = encrypted_config(&scratch, "litestream.yml", Some(&recipient), Some(&identity));
        let mut app = App::open(&scratch.db());
        before_start(&mut app);
        let mut litestream = litestream_replicating(&scratch, &config);
        wait_for_snapshot(&scratch);
        load(&mut app, "PASSIVE");
        // SAFETY: signalling our own child. Its exit status says nothing about the data (see
        // interop.rs); the restore below does.
        assert_eq!(unsafe { libc::kill(litestream.id() as i32, libc::SIGTERM) }, 0);
        litestream.wait().unwrap();
        for key in scratch.replica_keys() {
            assert!(scratch.read_object(&key).starts_with(b"age-encryption.org/v1\n"), "litestream wrote {key} in the clear");
        }

        let restored = scratch.path("by-walstream.db");
        let output = walstream_os(&os(&[&"restore", &"-config", &config, &"-o", &restored, &scratch.db()]));
        assert!(output.status.success(), "walstream restore failed: {}", stderr(&output));
        assert_same_database(&scratch.db(), &restored);
    }
}

/// A replica left unencrypted by a config that cannot encrypt: walstream refuses to start
/// rather than upload in the clear, and a key that does not parse names its place in the file.
#[test]
fn an_age_block_that_cannot_encrypt_is_refused_before_anything_is_uploaded() {
    let scratch = Scratch::new();
    App::open(&scratch.db()).insert(1);
    let (_, identity) = key_pair();
    let identities_only = encrypted_config(&scratch, "identities-only.yml", None, Some(&identity));
    let output = walstream_os(&os(&[&"replicate", &"-config", &identities_only]));
    assert_eq!(output.status.code(), Some(12), "{}", printed(&output));
    assert!(printed(&output).contains("age has identities but no recipients"), "{}", printed(&output));
    assert!(!scratch.path("replica").exists(), "nothing may be uploaded");

    let bad = encrypted_config(&scratch, "bad.yml", Some("age1notakey"), None);
    let output = walstream_os(&os(&[&"replicate", &"-config", &bad]));
    assert_eq!(output.status.code(), Some(12), "{}", printed(&output));
    assert!(
        printed(&output).contains("dbs[0].replicas[0].age.recipients[0] line 1: not an age X25519 recipient"),
        "{}",
        printed(&output)
    );
    assert!(!scratch.path("replica").exists(), "nothing may be uploaded");
}

/// An encrypted WAL segment far larger than restore may hold (litestream writes one segment per
/// sync, here a 40 MiB transaction of random rows) is decrypted and decoded as its parts
/// arrive: the restore stays under the same 32 MiB of peak RSS as a plain one.
#[test]
fn a_large_encrypted_segment_restores_in_bounded_memory() {
    let scratch = Scratch::new();
    let (recipient, identity) = key_pair();
    let config = encrypted_config(&scratch, "litestream.yml", Some(&recipient), Some(&identity));
    let mut app = App::open(&scratch.db());
    app.insert(1);
    let mut litestream = litestream_replicating(&scratch, &config);
    wait_for_snapshot(&scratch);
    app.insert_large(40 << 20);
    app.insert(1);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child (see interop.rs for why its status is not checked).
    assert_eq!(unsafe { libc::kill(litestream.id() as i32, libc::SIGTERM) }, 0);
    litestream.wait().unwrap();
    let largest = files_under(&scratch.path("replica"))
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".wal.lz4"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .max()
        .unwrap_or(0);
    assert!(largest > 32 << 20, "litestream's largest segment is {largest} bytes; the test proves nothing");

    let restored = scratch.path("by-walstream.db");
    let (config, restored_text, db) =
        (config.display().to_string(), restored.display().to_string(), scratch.db().display().to_string());
    let args = ["restore", "-config", &config, "-o", &restored_text, &db];
    let (peak_kib, _) = crate::restore::peak_rss_of_walstream(&args);
    eprintln!("restore with a {largest}-byte encrypted segment: peak RSS {peak_kib} KiB");
    assert!(peak_kib <= 32 << 10, "restore peaked at {peak_kib} KiB; the bound is 32 MiB");
    assert_same_database(&scratch.db(), &restored);
}
